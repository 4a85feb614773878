# The two commands of the README: `make site` and `make test`. Each creates .venv and installs
# what it needs; a second run reuses the venv (stamp file) and the container image.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
PYTHON ?= python3
VENV := $(CURDIR)/.venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# Podman settings for this kind of host (runc, explicit ulimits): see molecule/containers.conf.
export CONTAINERS_CONF := $(CURDIR)/molecule/containers.conf
export PATH := $(BIN):$(PATH)
export ANSIBLE_CONFIG := $(CURDIR)/ansible.cfg

IMAGE_BOOKWORM := localhost/esp32-fleet-debian:bookworm
IMAGE_TRIXIE := localhost/esp32-fleet-debian:trixie
# openssl for the PKI checks; mosquitto + clients run throwaway brokers in pytest; podman, runc and
# debootstrap for Molecule's containers.
SITE_DEBS := openssl
# openssh-client: Molecule's station scenario reaches its station container over real SSH.
# faketime: the upkeep tests move the clock; cron: its crontab, which ansible.builtin.cron needs.
# nginx: the OTA image server role's tests run it on this host.
TEST_DEBS := openssl mosquitto mosquitto-clients podman runc debootstrap uidmap slirp4netns openssh-client faketime cron nginx

.PHONY: site test check status venv lint sanity unit pytest molecule molecule-default molecule-rest molecule-fleet molecule-station image system-deps-site system-deps-test bench clean

site: venv system-deps-site
	$(BIN)/ansible-playbook site.yml

# pytest, the broker-only Molecule scenario and the other two (fleet, then station) run side by side:
# much of each is waiting (brokers, boards, SSH, apt in the containers; the fleet scenario alone
# leaves the CPUs ~60% idle). Their containers have their own names and their fixed ports (default
# 18883-18894, fleet 28883-28884, station 2222) sit below the ephemeral range the pytest brokers bind
# in. Each one's output is printed whole when it ends.
# The images (debootstrap: mostly network and disk) are built while lint and sanity use the CPUs.
# pytest and the scenarios all run even after one of them failed; their output is kept in
# .test-logs/test.log and the names of the failed tests are printed last, where a CI log's tail shows them.
test: venv system-deps-test
	$(MAKE) --no-print-directory -j3 --output-sync=target image lint sanity
	mkdir -p .test-logs
	rc=0; \
	$(MAKE) --no-print-directory -k -j3 --output-sync=target pytest molecule-default molecule-rest 2>&1 \
		| tee .test-logs/test.log || rc=1; \
	if [ $$rc -ne 0 ]; then \
		echo "=== make test failed; failed tests (whole output: .test-logs/test.log):"; \
		sed 's/\x1b\[[0-9;]*m//g' .test-logs/test.log \
			| grep -aoE '(FAILED|ERROR) +[^ ]+\.py(::[^ ]+)?|Molecule executed .*failed.*' | sort -u; \
	fi; \
	exit $$rc

# What expires when (CAs, CRLs, broker and device certificates, the last upkeep run): one table, the
# same as JSON in manifests/status.json; fails when anything lapses before upkeep can renew it.
status: venv
	$(BIN)/ansible-playbook playbooks/status.yml

# The developers' inner loop (a few minutes): lint and the tests that need no broker, no board and no
# container (module units, filters, the simulator's protocol, repository checks).
check: venv lint unit

venv: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements.txt
	$(BIN)/pip install -q --no-deps -e .
	$(BIN)/pip check
	touch $@

system-deps-site:
	scripts/system-deps.sh $(SITE_DEBS)

system-deps-test:
	scripts/system-deps.sh $(TEST_DEBS)

image: system-deps-test
	scripts/build-image.sh bookworm $(IMAGE_BOOKWORM)
	scripts/build-image.sh trixie $(IMAGE_TRIXIE)

lint: venv
	$(BIN)/yamllint -s .
	$(BIN)/ansible-lint
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# ansible-test sanity on the built and installed collection (scripts/sanity.sh).
sanity: venv
	scripts/sanity.sh

unit: venv
	$(BIN)/pytest -n 2 -m "not integration"

# Two workers: the tests are independent (temp dirs, ephemeral ports, own simulator boards).
pytest: venv
	$(BIN)/pytest -n 2 --durations=25

molecule: molecule-default molecule-rest

molecule-default: venv image
	$(BIN)/molecule test -s default

molecule-rest: molecule-fleet molecule-station

molecule-fleet: venv image
	$(BIN)/molecule test -s fleet

molecule-station: venv image
	$(BIN)/molecule test -s station

# Benchmarks (bench/README.md). Every script writes into
# bench/results/; the report is assembled even if one failed, then the target fails. converge.py
# reconfigures this machine's broker with a throwaway CA, like `make site` would: run `make site`
# afterwards to restore the project's own PKI.
bench: venv system-deps-test image
	mkdir -p bench/results
	rc=0; \
	$(BIN)/python bench/converge.py || rc=1; \
	$(BIN)/python bench/fleet_scale.py --provision-counts 1,4,16 --provision-bauds 921600 || rc=1; \
	$(BIN)/python bench/broker_load.py || rc=1; \
	$(BIN)/python bench/esp32sim_speed.py --repeat 1 --size 262144 | tee bench/results/esp32sim_speed.txt || rc=1; \
	$(BIN)/python bench/report.py || rc=1; \
	exit $$rc

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .test-logs
