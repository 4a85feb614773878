# Copyright: esp32-mqtt-fleet contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The pki role's device profile in Python: the client certificate every board gets, whoever signs it.

Used by the pki_sign_csr module (a board's own request, over the air) and by the
esp32_provision_board action (a key and certificate issued on the controller for a board on a serial
port), so both issue exactly the certificate the pki role's leaf.yml issues for a device: subject
CN=<device id>, O=<organization>; basicConstraints CA:FALSE and keyUsage digitalSignature, both
critical; extendedKeyUsage clientAuth; subject and authority key identifiers; SHA-256.

Keys are written 0600 from their first byte (mkstemp, then rename).
"""

from __future__ import annotations

import datetime
import os
import shutil
import tempfile

from ansible_collections.esp32_fleet.mqtt_fleet.plugins.module_utils.fleet_manifest import atomic_write

try:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    from cryptography.x509.oid import ExtendedKeyUsageOID, ExtensionOID, NameOID

    HAS_CRYPTOGRAPHY = True
except ImportError:  # reported by the caller
    HAS_CRYPTOGRAPHY = False


class DeviceCertError(Exception):
    """The CA or an existing file cannot be used; the message says which and why."""


def subject(common_name, organization):
    return x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization),
        ]
    )


def spki(key):
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def curve(name):
    """The curve object of a curve name: direct attribute access (not ec.__dict__, which cryptography
    >= 46.0.5 wraps in a proxy), looked up only when a key is made (cryptography may be missing)."""
    return {"secp256r1": ec.SECP256R1, "secp384r1": ec.SECP384R1, "secp521r1": ec.SECP521R1}[name]()


def describe(key):
    """Return (type, curve, size) of a loaded private key."""
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return "EC", key.curve.name, key.curve.key_size
    if isinstance(key, rsa.RSAPrivateKey):
        return "RSA", None, key.key_size
    return type(key).__name__, None, getattr(key, "key_size", None)


def generate(key_type, curve_name, size):
    if key_type == "EC":
        return ec.generate_private_key(curve(curve_name))
    return rsa.generate_private_key(public_exponent=65537, key_size=size)


def key_matches(key, key_type, curve_name, size):
    kind, have_curve, have_size = describe(key)
    if kind != key_type:
        return False
    return have_curve == curve_name if kind == "EC" else have_size == size


def write_key(key, path, passphrase=None):
    encryption = (
        serialization.BestAvailableEncryption(passphrase.encode())
        if passphrase is not None
        else serialization.NoEncryption()
    )
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)
    directory = os.path.dirname(path) or "."
    # mkstemp creates the file 0600 and os.replace keeps that mode: the key is never readable by
    # others, not even briefly. Not module.atomic_move: it chmods a new file to 0666 & ~umask (and
    # gives a replacement the old file's mode) before the file attributes bring it back to 0600.
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".pki_private_key.")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(pem)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def build(public_key, ca, ca_key, wanted_subject, days, now):
    """The device profile's certificate for public_key, signed by ca/ca_key, valid `days` from now."""
    ca_ski = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    builder = (
        x509.CertificateBuilder()
        .subject_name(wanted_subject)
        .issuer_name(ca.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(True, False, False, False, False, False, False, False, False), critical=True
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
    )
    return builder.sign(ca_key, hashes.SHA256())


def in_profile(cert, public_key, ca, wanted_subject):
    """True when cert is public_key's certificate in the device profile, directly issued by ca."""
    if spki(cert.public_key()) != spki(public_key) or cert.subject != wanted_subject:
        return False
    if cert.issuer != ca.subject:
        return False
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, x509.InvalidSignature):
        return False
    ext = {e.oid: e for e in cert.extensions}
    bc = ext.get(ExtensionOID.BASIC_CONSTRAINTS)
    ku = ext.get(ExtensionOID.KEY_USAGE)
    eku = ext.get(ExtensionOID.EXTENDED_KEY_USAGE)
    if ExtensionOID.SUBJECT_ALTERNATIVE_NAME in ext:
        return False
    if not (bc and bc.critical and not bc.value.ca and ku and ku.critical and ku.value.digital_signature):
        return False
    return bool(eku) and not eku.critical and list(eku.value) == [ExtendedKeyUsageOID.CLIENT_AUTH]


def facts(cert):
    """What the manifest records of a certificate, in community.crypto's formats."""
    return {
        "serial_number": cert.serial_number,
        "serial_hex": f"{cert.serial_number:x}",
        "sha256_fingerprint": ":".join(f"{b:02x}" for b in cert.fingerprint(hashes.SHA256())),
        "not_after": cert.not_valid_after_utc.strftime("%Y%m%d%H%M%SZ"),
    }


def read_certificate(path):
    """The certificate at path, or None when there is none or it is not a PEM certificate."""
    try:
        with open(path, "rb") as handle:
            return x509.load_pem_x509_certificate(handle.read())
    except (OSError, ValueError):
        return None


def _read_key(path):
    try:
        with open(path, "rb") as handle:
            return serialization.load_pem_private_key(handle.read(), password=None)
    except (OSError, ValueError, TypeError):
        return None


def _load_signer(profile):
    try:
        with open(profile["signer_cert"], "rb") as handle:
            ca = x509.load_pem_x509_certificate(handle.read())
    except (OSError, ValueError) as exc:
        raise DeviceCertError(f"cannot read the CA certificate {profile['signer_cert']}: {exc}") from None
    return ca


def _load_signer_key(profile, passphrase, ca):
    try:
        with open(profile["signer_key"], "rb") as handle:
            ca_key = serialization.load_pem_private_key(handle.read(), password=passphrase.encode())
    except (OSError, ValueError, TypeError):
        raise DeviceCertError(
            f"cannot read the CA key {profile['signer_key']} with the given passphrase"
        ) from None
    if spki(ca_key.public_key()) != spki(ca.public_key()):
        raise DeviceCertError(f"{profile['signer_key']} is not the key of {profile['signer_cert']}")
    return ca_key


def _chown(path, profile):
    if profile.get("owner") or profile.get("group"):
        shutil.chown(path, user=profile.get("owner") or None, group=profile.get("group") or None)


class Credentials:
    """A device's key and certificate as issued (or kept) for one flash, in memory until persist()."""

    def __init__(self, key, cert, key_is_new, cert_is_new, key_path, cert_path):
        self.key, self.cert = key, cert
        self.key_is_new, self.cert_is_new = key_is_new, cert_is_new
        self.key_path, self.cert_path = key_path, cert_path

    @property
    def changed(self):
        return self.key_is_new or self.cert_is_new

    def facts(self):
        return facts(self.cert)

    def key_pem(self):
        return self.key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )

    def cert_pem(self):
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def persist(self, profile, keep_key=True):
        """Write what is new: the certificate (0644) and, when keep_key, the key (0600 from its first
        byte). Without keep_key a key file left from an earlier attempt is removed."""
        directory = os.path.dirname(self.cert_path)
        if not os.path.isdir(directory):
            os.makedirs(directory, mode=0o700, exist_ok=True)
            _chown(directory, profile)
        if keep_key and self.key_is_new:
            write_key(self.key, self.key_path)
            _chown(self.key_path, profile)
        elif not keep_key and os.path.exists(self.key_path):
            os.unlink(self.key_path)
        if self.cert_is_new:
            atomic_write(self.cert_path, self.cert_pem(), 0o644)
            _chown(self.cert_path, profile)


def issue(device_id, profile, passphrase, now=None):
    """The key and certificate of device_id as the pki role's leaf.yml would issue them, in memory.

    profile: {devices_dir, signer_cert, signer_key, organization, validity_days, renew_before_days,
    key_type, key_curve, key_size, owner, group}. A key on disk of the wanted type is kept (an earlier
    attempt that wrote part of an image left it there); the certificate on disk is kept when it is
    that key's certificate in the device profile, from the signing CA, and does not expire within
    renew_before_days. Nothing is written: Credentials.persist() does that.
    """
    now = now or datetime.datetime.now(datetime.UTC).replace(microsecond=0)
    directory = profile["devices_dir"]
    key_path = os.path.join(directory, device_id + ".key")
    cert_path = os.path.join(directory, device_id + ".crt")
    ca = _load_signer(profile)
    key = _read_key(key_path)
    key_is_new = key is None or not key_matches(
        key, profile["key_type"], profile["key_curve"], profile["key_size"]
    )
    if key_is_new:
        key = generate(profile["key_type"], profile["key_curve"], profile["key_size"])
    wanted = subject(device_id, profile["organization"])
    cert = None if key_is_new else read_certificate(cert_path)
    renew_at = now + datetime.timedelta(days=int(profile["renew_before_days"]))
    current = cert is not None and in_profile(cert, key.public_key(), ca, wanted)
    if current and cert.not_valid_after_utc > renew_at:
        return Credentials(key, cert, key_is_new, False, key_path, cert_path)
    ca_key = _load_signer_key(profile, passphrase, ca)
    cert = build(key.public_key(), ca, ca_key, wanted, int(profile["validity_days"]), now)
    return Credentials(key, cert, key_is_new, True, key_path, cert_path)
