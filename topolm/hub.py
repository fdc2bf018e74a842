"""Datasets from the Hugging Face Hub: the local cache first, one `error:` line when neither it nor the
network has them.

Every Hub download of the project (BLiMP for blimp.py and ablate.py, GLUE for finetune.py, FineWeb-Edu
for data/fineweb/prepare.py) goes through `load_hub_dataset`, which
- reads the `datasets` cache first, with the Hub switched off, so a dataset loaded once loads again
  without the network and without a request;
- treats the Hub as unreachable when `HF_HUB_OFFLINE` or `HF_DATASETS_OFFLINE` is set, or when a
  connection to the Hub's host fails within `PROBE_SECONDS` (no proxy configured), and then refuses
  at once with one line naming the dataset and the key that reads local files instead, rather than
  letting `huggingface_hub` retry five times with a warning each;
- keeps `datasets`' and `huggingface_hub`'s log messages below errors (no retry or cache warnings
  before the project's own message); a real download still shows its progress bars.
"""
from __future__ import annotations

import contextlib
import os
import socket
from urllib.parse import urlparse

from topolm.config import UserError

OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")
PROBE_SECONDS = 3.0
_TRUE = {"1", "ON", "YES", "TRUE"}


def offline_requested() -> str | None:
    """The variable (e.g. 'HF_HUB_OFFLINE=1') that switches the Hub off in this environment, or None."""
    for name in OFFLINE_VARIABLES:
        if os.environ.get(name, "").strip().upper() in _TRUE:
            return f"{name}={os.environ[name]}"
    return None


def hub_unreachable() -> str | None:
    """Why the Hub cannot be reached (an offline variable, or a failed connection), or None.

    The connection probe opens one TCP connection to the Hub's host (`HF_ENDPOINT`, default
    huggingface.co) on port 443 with a timeout of PROBE_SECONDS; behind a proxy it is skipped, since
    only the proxy knows the way."""
    why = offline_requested()
    if why:
        return why
    if any(os.environ.get(name) for name in PROXY_VARIABLES):
        return None
    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=PROBE_SECONDS).close()
    except OSError as e:
        return f"{url.hostname} cannot be reached ({e.strerror or type(e).__name__})"
    return None


def _quiet_libraries() -> None:
    """datasets' and huggingface_hub's loggers at error level: their retry and cache warnings say nothing
    the refusal does not."""
    import datasets
    import huggingface_hub

    datasets.utils.logging.set_verbosity_error()
    huggingface_hub.utils.logging.set_verbosity_error()


@contextlib.contextmanager
def _hub_switched_off():
    """Within the block, datasets and huggingface_hub make no request (their offline flags set), and print
    no progress bars; both are put back after it."""
    import datasets
    import huggingface_hub.constants as hub_constants
    from datasets.utils.logging import disable_progress_bar, enable_progress_bar, is_progress_bar_enabled

    saved = datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE
    bars = is_progress_bar_enabled()
    datasets.config.HF_HUB_OFFLINE = hub_constants.HF_HUB_OFFLINE = True
    disable_progress_bar()
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE = saved
        if bars:
            enable_progress_bar()


def load_hub_dataset(repo: str, name: str | None = None, *, offline_key: str, split: str | None = None, **kwargs):
    """`datasets.load_dataset(repo, name, split=split, **kwargs)`, from the local cache when it holds the
    dataset, else from the Hub.

    offline_key says how to do without the Hub (e.g. "pass data_dir=<folder of <paradigm>.jsonl files>");
    it ends every refusal. Raises UserError (one line naming `repo`/`name`) when the dataset is not in the
    cache and the Hub is switched off or unreachable (within seconds, no request retried), or when the
    download fails."""
    label = f"{repo}/{name}" if name else repo
    if offline_requested():  # before datasets is imported: it reads the variables once, at import
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import datasets

    _quiet_libraries()
    try:
        with _hub_switched_off():
            return datasets.load_dataset(repo, name, split=split, **kwargs)
    except Exception:  # noqa: BLE001  (not cached, cached without this split, or a broken entry: ask the Hub)
        pass
    why = hub_unreachable()
    if why:
        raise UserError(f"cannot load {label}: it is not in the local Hugging Face cache and the Hub is off "
                        f"({why}); {offline_key}, or run once with the network to cache it")
    try:
        return datasets.load_dataset(repo, name, split=split, **kwargs)
    except Exception as e:  # noqa: BLE001  (any failure of the download is reported the same way)
        first = (str(e).splitlines() or [type(e).__name__])[0]
        raise UserError(f"cannot load {label} from the Hugging Face Hub: {first[:300]}; {offline_key}") from e
