"""Multi-host start-up: which (coordinator, process count, process id) each environment gives.

Table-driven over the environments a run meets (plain Cloud TPU VM slice through its metadata server,
GKE, SLURM, explicit settings, env vars, single process); the metadata server is a real HTTP server on
localhost answering like GCE's, so the real reader is exercised. The expected values are the
documented conventions of each platform (JAX's coordinator ports, SLURM's node-list syntax, the
`worker-network-endpoints` formats), written out by hand.
"""

import http.server
import threading

import pytest

from gmflow_jax.parallel.distributed import (
    TPU_COORDINATOR_PORT,
    detect_cluster,
    gce_metadata_reader,
    has_tpu_chips,
)

PORT = TPU_COORDINATOR_PORT


class FakeMetadataServer(http.server.BaseHTTPRequestHandler):
    """Answers /computeMetadata/v1/instance/attributes/<key> from `attributes` (404 otherwise);
    refuses requests without the Metadata-Flavor header, as GCE does."""

    attributes: dict[str, str] = {}

    def do_GET(self):  # noqa: N802 (http.server's name)
        prefix = "/computeMetadata/v1/instance/attributes/"
        key = self.path[len(prefix) :] if self.path.startswith(prefix) else None
        if self.headers.get("Metadata-Flavor") != "Google":
            self.send_response(403)
            self.end_headers()
            return
        if key not in self.attributes:
            self.send_response(404)
            self.end_headers()
            return
        body = self.attributes[key].encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def metadata_server():
    """Start a fake metadata server; yields a function installing attributes, returning its reader."""
    handler = type("Handler", (FakeMetadataServer,), {"attributes": {}})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()

    def serve(attributes):
        handler.attributes = dict(attributes)
        return gce_metadata_reader(f"127.0.0.1:{server.server_address[1]}", timeout_s=2.0)

    yield serve
    server.shutdown()
    server.server_close()


SLURM = {
    "SLURM_JOB_ID": "123457",
    "SLURM_NTASKS": "16",
    "SLURM_PROCID": "9",
    "SLURM_LOCALID": "1",
}
SLURM_PORT = 123457 % 4096 + 61440

# (name, env, metadata attributes or None (not a TPU VM), expected (kind, coordinator, n, id))
CASES = [
    ("nothing", {}, None, ("single", None, None, None)),
    ("slurm one task", {"SLURM_JOB_ID": "5", "SLURM_NTASKS": "1"}, None, ("single",) + (None,) * 3),
    (
        "slurm plain list",
        {**SLURM, "SLURM_STEP_NODELIST": "gpu17,gpu18"},
        None,
        ("slurm", f"gpu17:{SLURM_PORT}", 16, 9),
    ),
    (
        "slurm bracket range",
        {**SLURM, "SLURM_STEP_NODELIST": "node[007-015],login2"},
        None,
        ("slurm", f"node007:{SLURM_PORT}", 16, 9),
    ),
    (
        "slurm bracket list",
        {**SLURM, "SLURM_STEP_NODELIST": "a[3,9-12]"},
        None,
        ("slurm", f"a3:{SLURM_PORT}", 16, 9),
    ),
    (
        "env vars",
        {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"},
        None,
        ("env", "h:1", 2, 1),
    ),
    (
        "env vars win over slurm",
        {
            **SLURM,
            "SLURM_STEP_NODELIST": "x",
            "JAX_COORDINATOR_ADDRESS": "c:7",
            "JAX_NUM_PROCESSES": "3",
            "JAX_PROCESS_ID": "2",
        },
        None,
        ("env", "c:7", 3, 2),
    ),
    ("gke one host", {"TPU_WORKER_HOSTNAMES": "localhost"}, None, ("single",) + (None,) * 3),
    (
        "gke slice",
        {"TPU_WORKER_HOSTNAMES": "10.0.0.1,10.0.0.2,10.0.0.3,10.0.0.4", "TPU_WORKER_ID": "2"},
        None,
        ("gke", f"10.0.0.1:{PORT}", 4, 2),
    ),
    (
        "gke process addresses win",
        {
            "TPU_PROCESS_ADDRESSES": "p0:8476,p1:8476",
            "TPU_WORKER_HOSTNAMES": "h0,h1",
            "TPU_WORKER_ID": "1",
        },
        None,
        ("gke", f"p0:{PORT}", 2, 1),
    ),
    (
        "gke multislice",
        {
            "TPU_WORKER_HOSTNAMES": "a,b",
            "TPU_WORKER_ID": "1",
            "MEGASCALE_NUM_SLICES": "3",
            "MEGASCALE_SLICE_ID": "2",
            "MEGASCALE_COORDINATOR_ADDRESS": "mc:9999",
        },
        None,
        ("gke", f"mc:{PORT}", 6, 5),
    ),
    (
        "cloud tpu vm (metadata server), hostnames",
        {},
        {"agent-worker-number": "3", "worker-network-endpoints": "t1-w-0,t1-w-1,t1-w-2,t1-w-3"},
        ("gce", f"t1-w-0:{PORT}", 4, 3),
    ),
    (
        "cloud tpu vm, name:id:ip triples",
        {},
        {
            "agent-worker-number": "1",
            "worker-network-endpoints": "w0:uid0:10.1.0.5,w1:uid1:10.1.0.6",
        },
        ("gce", f"10.1.0.5:{PORT}", 2, 1),
    ),
    (
        "cloud tpu vm multislice via tpu-env",
        {},
        {
            "agent-worker-number": "0",
            "worker-network-endpoints": "a,b",
            "tpu-env": "MEGASCALE_NUM_SLICES: '2'\nMEGASCALE_SLICE_ID: '1'\n"
            "MEGASCALE_COORDINATOR_ADDRESS: 'c0'\nTPU_ACCELERATOR_TYPE: 'v5p-16'",
        },
        ("gce", f"c0:{PORT}", 4, 2),
    ),
    (
        "cloud tpu vm of one host",
        {},
        {"agent-worker-number": "0", "worker-network-endpoints": "only"},
        ("single",) + (None,) * 3,
    ),
    ("tpu vm whose metadata names no workers", {}, {}, ("single",) + (None,) * 3),
]


@pytest.mark.parametrize("name,env,attributes,expected", CASES, ids=[c[0] for c in CASES])
def test_detected_cluster(name, env, attributes, expected, metadata_server):
    if attributes is None:
        spec = detect_cluster(env, tpu_vm=False)
    else:
        spec = detect_cluster(env, metadata=metadata_server(attributes), tpu_vm=True)
    assert (spec.kind, spec.coordinator_address, spec.num_processes, spec.process_id) == expected
    assert spec.is_multi_process == (expected[0] != "single")


def test_explicit_settings_win_over_everything():
    env = {**SLURM, "SLURM_STEP_NODELIST": "x", "TPU_WORKER_HOSTNAMES": "a,b", "TPU_WORKER_ID": "0"}
    spec = detect_cluster(env, "127.0.0.1:9", 4, 3, tpu_vm=False)
    assert (spec.kind, spec.coordinator_address, spec.num_processes, spec.process_id) == (
        "explicit",
        "127.0.0.1:9",
        4,
        3,
    )


def test_env_local_device_ids_are_passed_on():
    env = {
        "JAX_COORDINATOR_ADDRESS": "h:1",
        "JAX_NUM_PROCESSES": "2",
        "JAX_PROCESS_ID": "0",
        "JAX_LOCAL_DEVICE_IDS": "0,1",
    }
    assert detect_cluster(env, tpu_vm=False).local_device_ids == (0, 1)


@pytest.mark.parametrize(
    "env,kwargs,message",
    [
        ({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_PROCESS_ID": "0"}, {}, "JAX_NUM_PROCESSES"),
        ({}, {"coordinator_address": "h:1"}, "needs num_processes and process_id"),
        ({"SLURM_JOB_ID": "5", "SLURM_NTASKS": "4"}, {}, "SLURM_STEP_NODELIST.*srun"),
        ({"TPU_WORKER_HOSTNAMES": "a,b"}, {}, "TPU_WORKER_ID is unset"),
        ({"TPU_WORKER_HOSTNAMES": "a,b", "TPU_WORKER_ID": "2"}, {}, "worker id 2 is not in"),
        (
            {"JAX_COORDINATOR_ADDRESS": "h", "JAX_NUM_PROCESSES": "x", "JAX_PROCESS_ID": "0"},
            {},
            "x",
        ),
    ],
)
def test_incomplete_or_bad_settings_name_the_field(env, kwargs, message):
    with pytest.raises(ValueError, match=message):
        detect_cluster(env, tpu_vm=False, **kwargs)


def test_a_machine_without_tpu_chips_never_asks_the_metadata_server(tmp_path):
    asked = []

    def reader(key):
        asked.append(key)
        return "0"

    (tmp_path / "0000:00:04.0").mkdir()
    (tmp_path / "0000:00:04.0" / "vendor").write_text("0x8086\n")
    assert not has_tpu_chips(str(tmp_path))
    assert detect_cluster({"TPU_SKIP_MDS_QUERY": "1"}, metadata=reader).kind == "single"
    assert asked == []
    (tmp_path / "0000:00:05.0").mkdir()
    (tmp_path / "0000:00:05.0" / "vendor").write_text("0x1ae0\n")
    assert has_tpu_chips(str(tmp_path))


def test_metadata_reader_returns_none_for_absent_keys_and_unreachable_servers(metadata_server):
    read = metadata_server({"agent-worker-number": "7"})
    assert read("agent-worker-number") == "7"
    assert read("worker-network-endpoints") is None
    assert gce_metadata_reader("127.0.0.1:9", timeout_s=0.5)("x") is None  # nothing listens
