"""Stores on object storage (fsspec URLs: s3://, gs://, memory://...): filesystem options and one-line errors.

Credentials and the endpoint come from the filesystem's usual configuration; for ``s3://`` (s3fs,
``pip install chx[s3]``) that is botocore's: ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` (or
``AWS_PROFILE``, ~/.aws, an instance role), ``AWS_ENDPOINT_URL`` (or ``AWS_ENDPOINT_URL_S3``) for a
non-AWS server (MinIO, Ceph, moto), ``AWS_DEFAULT_REGION``. chx bounds every S3 call: connect
timeout ``CHX_S3_CONNECT_TIMEOUT`` (default 5 s), read timeout ``CHX_S3_READ_TIMEOUT`` (60 s), and
``CHX_S3_RETRIES`` attempts (3) for botocore and s3fs each, so a wrong endpoint fails in seconds,
not minutes; listings are never cached (other writers add shards meanwhile). Before a store is opened or created its bucket is checked once: a bucket that does
not exist, refused credentials and an unreachable endpoint are each one ChxError line.
"""

from __future__ import annotations

import logging
import os

from chx.errors import ChxError

S3_PROTOCOLS = ("s3", "s3a")
EXTRA = {"s3": "chx[s3]", "s3a": "chx[s3]", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs"}


def protocol(path) -> str:
    p = str(path)
    return p.split("://", 1)[0].lower() if "://" in p else ""


def _env_number(name: str, default: float, cast=float):
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = cast(raw)
    except ValueError:
        raise ChxError(f"{name}={raw!r} is not a number; set it to e.g. {default}") from None
    if value <= 0:
        raise ChxError(f"{name}={raw!r} must be positive")
    return value


def retries() -> int:
    return _env_number("CHX_S3_RETRIES", 3, int)


def storage_options(path) -> dict:
    """fsspec options chx passes for this URL: bounded timeouts and retries for S3; none elsewhere."""
    if protocol(path) not in S3_PROTOCOLS:
        return {}
    # No listing cache: other writers add shards all the time, and a done marker is found by listing.
    return {"use_listings_cache": False,
            "config_kwargs": {"connect_timeout": _env_number("CHX_S3_CONNECT_TIMEOUT", 5.0),
                              "read_timeout": _env_number("CHX_S3_READ_TIMEOUT", 60.0),
                              "retries": {"max_attempts": retries(), "mode": "standard"}}}


def bound(fs) -> None:
    """s3fs retries each call itself too (5 times by default): bound that as well."""
    if type(fs).__module__.startswith("s3fs"):
        fs.retries = retries()
        logging.getLogger("asyncio").addFilter(_quiet_lost_requests)


def _quiet_lost_requests(record: logging.LogRecord) -> bool:
    """When the endpoint stops answering, aiohttp's task sending a request body fails too and asyncio
    logs its traceback when the task is collected ("Task exception was never retrieved"): dropped,
    since the request's own error is retried, then reported in one line (:func:`stopped_answering`)."""
    exc = record.exc_info[1] if record.exc_info else None
    return exc is None or not {c.__name__ for c in type(exc).__mro__} & NO_ANSWER


def missing_package(path, e: ImportError) -> ChxError:
    extra = EXTRA.get(protocol(path))
    how = f"pip install {extra}" if extra else "install the fsspec filesystem package for this URL"
    return ChxError(f"feature store {path}: {protocol(path)}:// URLs need a package that is not installed "
                    f"({e}); {how}, or use a local path")


def filesystem(path):
    """(fsspec filesystem, path inside it) for a URL, with chx's bounds."""
    import fsspec

    try:
        fs, root = fsspec.core.url_to_fs(str(path), **storage_options(path))
    except ImportError as e:
        raise missing_package(path, e) from None
    except ValueError as e:
        raise ChxError(f"feature store {path}: cannot open this URL ({e}); check the path") from None
    bound(fs)
    return fs, root


# What botocore/aiobotocore/aiohttp raise (by class name, the packages being optional) when the
# endpoint does not answer: refused or reset connections, a server gone mid-request, timeouts.
NO_ANSWER = frozenset({
    "EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError", "ConnectionClosedError",
    "ClientConnectorError", "ServerDisconnectedError", "ServerTimeoutError", "ClientPayloadError",
    "ResponseStreamingError", "IncompleteReadError", "TimeoutError", "ConnectionRefusedError",
    "ConnectionResetError", "BrokenPipeError", "ProxyConnectionError"})


def stopped_answering(path, e: BaseException) -> ChxError | None:
    """The one line for an object store that stopped answering while a command used it (the
    endpoint went away mid-write or mid-read, after the first checks passed); None for anything else
    and for local paths (their OSErrors are the caller's)."""
    if not protocol(path) or not {c.__name__ for c in type(e).__mro__} & NO_ANSWER:
        return None
    text = " ".join(str(e).split())[:160]
    bound_by = (f"each request bounded by CHX_S3_CONNECT_TIMEOUT/CHX_S3_READ_TIMEOUT, {retries()} tries"
                if protocol(path) in S3_PROTOCOLS else "")
    return ChxError(f"store {path}: the object store stopped answering ({type(e).__name__}: {text}"
                    f"{'; ' + bound_by if bound_by else ''}); rerun the same command to resume: finished "
                    f"shards are kept")


def error(path, e: BaseException) -> ChxError | None:
    """The one line for a storage error that is the user's to fix (missing bucket, refused
    credentials, unreachable endpoint, timeout); None for anything else."""
    name = type(e).__name__
    names = {c.__name__ for c in type(e).__mro__}
    text = " ".join(str(e).split())[:160]
    bucket = str(path).split("://", 1)[-1].split("/", 1)[0]
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or "the default AWS endpoint"
    s3 = protocol(path) in S3_PROTOCOLS
    if "NoSuchBucket" in text or (isinstance(e, FileNotFoundError) and "bucket" in text.lower()):
        return ChxError(f"feature store {path}: bucket {bucket!r} does not exist{f' at {endpoint}' if s3 else ''}; "
                        f"create it, or check the URL" + (" and AWS_ENDPOINT_URL" if s3 else ""))
    if isinstance(e, PermissionError) or any(t in text for t in ("InvalidAccessKeyId", "SignatureDoesNotMatch",
                                                                  "AccessDenied", "Forbidden", "ExpiredToken")):
        who = ("check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) and the bucket's policy"
               if s3 else "check the credentials")
        return ChxError(f"feature store {path}: access denied ({text}); {who}")
    if names & (NO_ANSWER | {"NoCredentialsError"}):
        if name == "NoCredentialsError":
            return ChxError(f"feature store {path}: no S3 credentials found; set AWS_ACCESS_KEY_ID and "
                            f"AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)")
        return ChxError(f"feature store {path}: cannot reach the storage endpoint {endpoint if s3 else ''} "
                        f"({name}: {text}); check AWS_ENDPOINT_URL and the network (tried "
                        f"{retries()} times, CHX_S3_CONNECT_TIMEOUT/CHX_S3_READ_TIMEOUT bound each try)"
                        if s3 else f"feature store {path}: cannot reach the storage ({name}: {text}); check the network")
    return None


def check(path) -> None:
    """One cheap call before a store on object storage is used: its bucket exists, the credentials
    are taken and the endpoint answers (S3; other URLs: nothing to check here). ChxError otherwise."""
    if protocol(path) not in S3_PROTOCOLS:
        return
    fs, root = filesystem(path)
    bucket = root.split("/", 1)[0]
    try:
        fs.info(bucket)
    except Exception as e:   # noqa: BLE001 - classified below
        if isinstance(e, FileNotFoundError):
            e = FileNotFoundError(f"NoSuchBucket: {e}")
        mapped = error(path, e)
        if mapped is not None:
            raise mapped from None
        raise ChxError(f"feature store {path}: the storage refused a request ({type(e).__name__}: "
                       f"{' '.join(str(e).split())[:160]}); check the URL and credentials") from None
