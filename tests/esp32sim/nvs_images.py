"""Build NVS images with Espressif's own generator (esp_idf_nvs_partition_gen)."""

import io

from esp_idf_nvs_partition_gen import nvs_partition_gen as gen


def build_nvs(namespaces: dict, size: int = 0x6000, version: int = 2) -> bytes:
    """namespaces: {ns: {key: (encoding, value)}} -> image bytes (generator's Python API)."""
    out = io.BytesIO()
    # Like the CLI: the API's size excludes the reserved (last, empty) page it appends.
    nvs = gen.nvs_open(out, size - 4096, gen.Page.VERSION2 if version == 2 else gen.Page.VERSION1)
    for ns, entries in namespaces.items():
        gen.write_entry(nvs, ns, "namespace", "", "")
        for key, (encoding, value) in entries.items():
            gen.write_entry(nvs, key, "data", encoding, value)
    gen.nvs_close(nvs)
    image = out.getvalue()
    assert len(image) == size, f"the generator wrote {len(image)} bytes, not {size}"
    return image


def mqtt_namespaces(device_id, broker_uri, ca, cert, key, topic_root=None):
    return {
        "mqtt": {
            "broker_uri": ("string", broker_uri),
            "device_id": ("string", device_id),
            "topic_root": ("string", topic_root or f"devices/{device_id}"),
            "ca_cert": ("string", ca),
            "client_cert": ("string", cert),
            "client_key": ("string", key),
        },
        "wifi": {"ssid": ("string", "lab-net"), "password": ("string", "not-a-real-psk")},
    }
