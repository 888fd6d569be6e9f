"""The feature store on S3, against a real S3 server started by the tests (moto's server mode on
127.0.0.1, a free port; s3fs as chx does it: the `chx[s3]` extra). No call is mocked: every byte goes
through s3fs and botocore over HTTP to the local server, and nothing leaves the loopback address.

Covers: several writers starting at once into one `s3://` store (store API and `extract-features
--shard i/2` processes), `store info`/`verify`, `--repair` after a shard object is deleted,
`train-fusion` streaming from the bucket, `evaluate`, a SIGKILLed writer resumed by a rerun, and one
line each for a missing bucket, refused credentials, an unreachable endpoint and a missing s3fs.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid

import numpy as np
import pytest

pytest.importorskip("s3fs", reason="needs the s3 extra: pip install 'chx[s3]'")
moto_server = pytest.importorskip("moto.server", reason="needs moto[server] (pip install 'chx[dev]')")

from helpers import ROOT, run_chx, shared_path  # noqa: E402
from test_store import image_features, make_inputs, write_shard  # noqa: E402

from chx.errors import ChxError  # noqa: E402
from chx.store import create_store, open_store  # noqa: E402

BUCKET = "chx-test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server on 127.0.0.1 and a bucket; the AWS_* variables point every client (this
    process and its subprocesses) at it, and nothing else (no profile, no config files)."""
    import logging

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=_free_port(), verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
           "NO_PROXY": "127.0.0.1", "no_proxy": "127.0.0.1", "CHX_S3_CONNECT_TIMEOUT": "2"}
    with pytest.MonkeyPatch.context() as mp:
        for k in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3", "HTTP_PROXY", "HTTPS_PROXY",
                  "http_proxy", "https_proxy"):
            mp.delenv(k, raising=False)
        for k, v in env.items():
            mp.setenv(k, v)
        _clear_cache()
        fs = _fs()
        fs.mkdir(BUCKET)
        yield fs
        _clear_cache()
    server.stop()


def _fs():
    import s3fs

    return s3fs.S3FileSystem(skip_instance_cache=True)


def _clear_cache() -> None:
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()   # a new environment (credentials, endpoint): new clients


def _url(name: str) -> str:
    return f"s3://{BUCKET}/{name}-{uuid.uuid4().hex[:8]}.zarr"


def _one_line(code: int, out: str, err: str, *words: str) -> None:
    assert code == 2, out + err
    lines = [x for x in err.strip().splitlines() if x.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    for w in words:
        assert w in err, err


def _chx(*args, env=None, **popen) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "chx", *map(str, args)], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", **(env or {})},
                            **popen)


def _maps(store) -> dict:
    out = {}
    with open_store(store) as s:          # one read per shard (a read per image is slow on S3)
        for sh in range(s.n_shards):
            a, b = s.shard_rows(sh)
            out.update(zip(s.image_ids[a:b], s.read_shard(sh)[0]))
    return out


# ------------------------------------------------------------------------------- request counts
@pytest.fixture
def requests(monkeypatch):
    """Every S3 request this process makes, as (operation, key): s3fs's one call per request, counted
    and passed through to the server unchanged."""
    import s3fs

    made, real = [], s3fs.S3FileSystem._call_s3

    async def counted(self, method, *args, **kw):
        made.append((method, kw.get("Key", "")))
        return await real(self, method, *args, **kw)

    monkeypatch.setattr(s3fs.S3FileSystem, "_call_s3", counted)
    return made


def test_request_counts_of_a_shard_write_a_shard_read_and_a_study(s3, requests):
    """What a store costs on S3 over a plain object (1 PUT to write, 1 GET to read): a shard write is
    3 requests (its done record deleted, the shard object put whole, the done record put), 2 when the
    writer has seen no done record for it (what extraction does: it reads them to find its work), a shard
    read 2 (one ranged GET of the rows, one of the done record with the rows' checksums; the record
    is kept once the store is complete, so a second read is 1), a study 1 (2 in a shard not read yet).
    Each row still checked against its checksum: a changed byte is refused."""
    url = _url("count")
    with create_store(url, **make_inputs(n_studies=14, seed=3), flip=False, shard_images=4) as s:
        requests.clear()
        write_shard(s, 0)
        assert [m for m, _ in requests] == ["delete_object", "put_object", "put_object"], requests
        assert requests[1][1].endswith("/features/c.0.0.0.0") and requests[2][1].endswith("/shard_done/c.0.0")
        # a writer reads the done records first (its work left): a shard it saw without one is written
        # in 2 requests, no DELETE; one it saw done is cleared first as above
        assert s.missing_shards().tolist() == list(range(1, s.n_shards))
        requests.clear()
        write_shard(s, 1)
        assert [m for m, _ in requests] == ["put_object", "put_object"], requests
        requests.clear()
        write_shard(s, 0)
        assert [m for m, _ in requests] == ["delete_object", "put_object", "put_object"], requests
        for sh in range(2, s.n_shards):
            write_shard(s, sh)
        s.mark_complete()
        ptr = s.study_ptr
    with open_store(url, require_complete=True) as s:
        requests.clear()
        maps = s.read_shard(1)[0]
        assert [m for m, _ in requests] == ["get_object"] * 2, requests
        assert np.array_equal(maps, image_features(s.image_ids[4:8]).astype(np.float16))
        requests.clear()
        s.read_shard(1)
        assert len(requests) == 1, requests
        late = int(np.flatnonzero(ptr[:-1] >= 2 * 4)[-1])            # a study in a shard not read yet
        for i, most in ((late, 2), (late, 1), (int(np.flatnonzero(ptr[:-1] // 4 == 1)[0]), 1)):
            requests.clear()
            st = s.read_study(i)
            assert len(requests) <= most, (i, requests)
            assert np.array_equal(st.features, image_features(st.image_ids).astype(np.float16))
    key = url.removeprefix("s3://") + "/features/c.1.0.0.0"
    raw = bytearray(s3.cat_file(key))
    raw[100] ^= 1
    s3.pipe_file(key, bytes(raw))
    with open_store(url) as s, pytest.raises(ChxError, match="do not match their checksum"):
        s.read_shard(1)


# ------------------------------------------------------------------------------- store API, fast
WRITER = """
import sys, time, numpy as np
sys.path[:0] = [{tests!r}]
from pathlib import Path
from test_store import make_inputs, write_shard
from chx.store import create_store
while not Path({go!r}).exists():
    time.sleep(0.005)
with create_store({url!r}, **make_inputs(n_studies=14, seed=3), flip=True, shard_images=4) as s:
    for sh in s.shards_for_writer({i}, {n}):
        write_shard(s, int(sh))
"""


@pytest.mark.parametrize("writers", [2, 3])
def test_writers_starting_at_once_create_one_store(s3, tmp_path, writers):
    """N processes create the same s3:// store at the same instant (no lock service) and each writes
    its shards: the store is whole and equals one written by a single process (the bug: a
    ContainsArrayError traceback and shards missing)."""
    url, go = _url("par"), tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", WRITER.format(tests=str(ROOT / "tests"), go=str(go), url=url,
                                                                     i=i, n=writers)],
                              stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
             for i in range(writers)]
    time.sleep(2.0)    # every writer imported chx and waits at the barrier
    go.touch()
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    inp = make_inputs(n_studies=14, seed=3)
    with open_store(url, "r+") as s:
        assert len(s.missing_shards()) == 0 and len(s.shards_without_objects()) == 0
        s.mark_complete()
        assert s.verify().ok
        for r in range(s.n_images):
            np.testing.assert_array_equal(s.read_image(r), image_features([s.image_ids[r]])[0].astype(np.float16))
        assert sorted(s.image_ids) == sorted(inp["image_ids"])
    # A late writer (the store exists and is complete) reopens it; one with other inputs is refused.
    with create_store(url, **inp, flip=True, shard_images=4) as s:
        assert s.complete
    with pytest.raises(ChxError, match="made differently"):
        create_store(url, **make_inputs(n_studies=14, seed=4), flip=True, shard_images=4)


def test_joining_an_interrupted_creation(s3):
    """A creation that stopped half-way (root group and some arrays, no format_version) is finished
    by the next writer with the same inputs - never deleted, never refused."""
    import zarr

    from chx.store._api import _spec
    from chx.store._zarr import _make_store

    url, inp = _url("half"), make_inputs(n_studies=6, seed=5)
    g = zarr.create_group(store=_make_store(url, read_only=False), attributes={"chx_feature_store": True})
    spec = _spec(inp["image_ids"], inp["study_ids"], inp["views"], inp["splits"], inp["labels"], inp["class_names"],
                 inp["feature_shape"], inp["fingerprint"], False, False, "float16", 4, None)
    g.create_array("features", shape=(spec.layout.n_images, *spec.feature_shape), dtype="float16",
                   chunks=(1, *spec.feature_shape), shards=(4, *spec.feature_shape), fill_value=0,
                   chunk_key_encoding={"name": "default", "separator": "."}, compressors=None)
    from chx.store import backend_class

    assert backend_class(url).probe(url)[0] == "creating"
    with create_store(url, **inp, shard_images=4) as s:
        for sh in range(s.n_shards):
            a, b = s.shard_rows(sh)
            s.write_shard(sh, image_features(s.image_ids[a:b]))
        s.mark_complete()
    with open_store(url, require_complete=True) as s:
        assert s.verify().ok
    # a half-made store of a different layout: one line, not a traceback
    url2 = _url("half2")
    g = zarr.create_group(store=_make_store(url2, read_only=False), attributes={"chx_feature_store": True})
    g.create_array("features", shape=(3, 1, 1, 1), dtype="float16", chunks=(1, 1, 1, 1), fill_value=0)
    with pytest.raises(ChxError, match="different layout"):
        create_store(url2, **inp, shard_images=4)


# ---------------------------------------------------------------------------- errors: one line each
def test_missing_bucket_is_one_line(s3, capsys):
    t0 = time.time()
    _one_line(*run_chx(capsys, "store", "info", "s3://no-such-bucket/f.zarr"), "no-such-bucket", "does not exist")
    _one_line(*run_chx(capsys, "store", "verify", "s3://no-such-bucket/f.zarr"), "does not exist")
    assert time.time() - t0 < 10


def test_wrong_credentials_are_one_line(s3, capsys, monkeypatch):
    from moto.core.authorization import enable_iam_authentication

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAWRONGWRONGWRONG1")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    _clear_cache()
    try:
        with enable_iam_authentication():    # the server checks signatures: the key is unknown
            t0 = time.time()
            _one_line(*run_chx(capsys, "store", "info", f"s3://{BUCKET}/f.zarr"), "access denied", "AWS_ACCESS_KEY_ID")
            assert time.time() - t0 < 10
    finally:
        _clear_cache()


@pytest.mark.parametrize("command", [("store", "info"), ("store", "verify")])
def test_unreachable_endpoint_is_one_line_and_quick(s3, capsys, monkeypatch, command):
    port = _free_port()                      # nothing listens there: connection refused
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("CHX_S3_RETRIES", "2")
    _clear_cache()
    try:
        t0 = time.time()
        _one_line(*run_chx(capsys, *command, f"s3://{BUCKET}/f.zarr"), "cannot reach", f"127.0.0.1:{port}",
                  "AWS_ENDPOINT_URL")
        assert time.time() - t0 < 15
    finally:
        _clear_cache()


def test_missing_s3fs_is_one_line(tmp_path):
    code = ("import sys; sys.modules['s3fs'] = None\n"      # as if the extra were not installed
            "from chx.cli import main; main(['store', 'info', 's3://b/f.zarr'])")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "pip install chx[s3]" in p.stderr and "Traceback" not in p.stderr, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1, p.stderr


# ------------------------------------------------------------------------ the CLI on real images
def _extract_args(backbone, manifest, url, *more):
    return ("extract-features", "--checkpoint", backbone, "--manifest", manifest, "--images",
            shared_path("covid-cxr", "images"), "--store", url, "--workers", "0", "--batch-size", "4",
            "--shard-images", "4", *more)


@pytest.fixture(scope="module")
def small(tmp_path_factory, covid_manifest, covid_backbone):
    """64 real covid images (whole studies, train and val) and their store extracted locally by one
    process: what every S3 extraction must equal, map for map."""
    import polars as pl

    df = pl.read_parquet(covid_manifest)
    keep = []
    for split in ("train", "val"):
        studies = df.filter(pl.col("split") == split)["study_id"].unique(maintain_order=True).to_list()
        keep += studies[:24 if split == "train" else 10]
    tmp = tmp_path_factory.mktemp("s3-small")
    manifest = tmp / "small.parquet"
    df.filter(pl.col("study_id").is_in(keep)).write_parquet(manifest)
    ref = tmp / "ref.zarr"
    from chx.pipeline.extract import extract_features

    extract_features(covid_backbone, manifest, shared_path("covid-cxr", "images"), str(ref), workers=0,
                     batch_size=4, shard_images=4, echo=lambda *a: None)
    return {"manifest": manifest, "ref": ref, "backbone": covid_backbone}


def test_two_shard_writers_then_info_verify_repair_train_evaluate(s3, capsys, tmp_path, small):
    url, covid_backbone, covid_manifest = _url("cli"), small["backbone"], small["manifest"]
    procs = [_chx(*_extract_args(covid_backbone, covid_manifest, url, "--shard", f"{i}/2")) for i in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, out + err
    assert any("is complete" in out for out, _ in outs)
    ref = _maps(small["ref"])
    got = _maps(url)
    assert got.keys() == ref.keys() and all(np.array_equal(ref[k], got[k]) for k in ref)

    code, out, err = run_chx(capsys, "store", "info", url)
    assert code == 0 and "complete           True" in out and f"images             {len(ref)}" in out, out + err
    assert run_chx(capsys, "store", "verify", url)[0] == 0

    s3.rm(url.removeprefix("s3://") + "/features/c.3.0.0.0")           # one shard object lost
    code, out, err = run_chx(capsys, "store", "verify", url)
    assert code == 2 and "1 damaged shard(s)" in out, out + err
    code, out, err = run_chx(capsys, *_extract_args(covid_backbone, covid_manifest, url, "--repair"))
    assert code == 0 and "repair: 1 damaged shard(s)" in out and "wrote 4 images" in out, out + err
    assert run_chx(capsys, "store", "verify", url)[0] == 0
    got = _maps(url)
    assert all(np.array_equal(ref[k], got[k]) for k in ref)

    code, out, err = run_chx(capsys, "train-fusion", "--store", url, "-o", tmp_path / "fusion", "--preload", "off",
                             "--max-steps", "2", "--workers", "0", "--device", "cpu", "--dim", "32", "--heads", "4",
                             "--ffn-dim", "64", "--batch-size", "8")
    assert code == 0, out + err
    code, out, err = run_chx(capsys, "evaluate", "--checkpoint", tmp_path / "fusion" / "best.pt", "--store", url,
                             "--split", "val", "--thresholds-from", "none", "--workers", "0",
                             "-o", tmp_path / "eval")
    assert code == 0, out + err
    assert (tmp_path / "eval" / "metrics.json").exists()


def _wait_for_done_shards(s3, url: str, p, n: int = 2, timeout: float = 240) -> None:
    """Until the writer ``p`` has marked ``n`` shards of ``url`` done (or ended, or time ran out)."""
    prefix = url.removeprefix("s3://") + "/shard_done/"
    deadline = time.time() + timeout
    while time.time() < deadline and p.poll() is None:
        try:
            if len([k for k in s3.ls(prefix, refresh=True) if "/c." in k]) >= n:
                return
        except FileNotFoundError:
            pass
        time.sleep(0.01)     # a shard is written in 3 requests: poll often, or the writer finishes first


def test_killed_writer_resumes(s3, capsys, small):
    """A writer SIGKILLed mid-extraction leaves done shards and maybe a shard in flight; rerunning the
    same command finishes the store, equal to an uninterrupted run."""
    url, covid_backbone, covid_manifest = _url("kill"), small["backbone"], small["manifest"]
    p = _chx(*_extract_args(covid_backbone, covid_manifest, url))
    _wait_for_done_shards(s3, url, p)
    assert p.poll() is None, "the writer finished before it could be killed"
    p.send_signal(signal.SIGKILL)
    p.communicate(timeout=60)
    with open_store(url) as s:
        left = len(s.missing_shards())
        assert 0 < left < s.n_shards and not s.complete
    code, out, err = run_chx(capsys, *_extract_args(covid_backbone, covid_manifest, url))
    assert code == 0 and "is complete" in out, out + err
    assert run_chx(capsys, "store", "verify", url)[0] == 0
    ref, got = _maps(small["ref"]), _maps(url)
    assert all(np.array_equal(ref[k], got[k]) for k in ref)


def test_server_stopping_mid_extraction_is_one_line_then_a_rerun_resumes(s3, small):
    """The object store goes away while a writer is filling shards (a second moto server on its own
    port, sharing the first one's buckets, is stopped): the writer ends within the CHX_S3_* bounds
    with exit code 2 and one line saying so, no traceback; with the server back on that port the
    same command finishes the store, equal to an uninterrupted run."""
    import logging

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    port = _free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    url, covid_backbone, covid_manifest = _url("stop"), small["backbone"], small["manifest"]
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "CHX_S3_RETRIES": "2", "CHX_S3_CONNECT_TIMEOUT": "2",
           "CHX_S3_READ_TIMEOUT": "5"}
    try:
        p = _chx(*_extract_args(covid_backbone, covid_manifest, url), env=env)
        _wait_for_done_shards(s3, url, p)
        assert p.poll() is None, "the writer finished before the server could be stopped"
    finally:
        server.stop()
    t0 = time.time()
    out, err = p.communicate(timeout=120)
    assert time.time() - t0 < 90, "the writer took too long to give up"
    _one_line(p.returncode, out, err, f"store {url}: the object store stopped answering",
              "rerun the same command to resume")
    with open_store(url) as s:
        assert 0 < len(s.missing_shards()) < s.n_shards and not s.complete

    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()                                  # the server back, with what was written
    try:
        p = _chx(*_extract_args(covid_backbone, covid_manifest, url), env=env)
        out, err = p.communicate(timeout=300)
    finally:
        server.stop()
    assert p.returncode == 0 and "is complete" in out, out + err
    ref, got = _maps(small["ref"]), _maps(url)
    assert got.keys() == ref.keys() and all(np.array_equal(ref[k], got[k]) for k in ref)
