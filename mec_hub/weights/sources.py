"""Where weights come from: parse a weights spec, fetch the files, verify them.

A spec is one of: a registry name (``mec_resnet50``), a local ``.safetensors`` file, a local
folder (``config.json`` + ``model.safetensors``), ``hf-hub:org/name[@revision]``, an
``https://`` URL of a ``.safetensors`` file, ``bundled:NAME`` (a folder shipped inside this
package), or ``"DEFAULT"`` (torchvision's word: the model's own published weights, as when no
weights are given). Downloads go through huggingface_hub (its cache, ``HF_HUB_OFFLINE``, revision pins)
or, for a plain URL, ``_http_download`` (bounded reads, complete or nothing). Only safetensors are ever read
from a download.
"""

from __future__ import annotations

import hashlib
import http.client
import inspect
import os
import re
import urllib.error
import urllib.request
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path
from urllib.parse import urlparse

from huggingface_hub import constants, hf_hub_download, hf_hub_url, try_to_load_from_cache
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import validate_repo_id

from mec_hub import __version__
from mec_hub.errors import (
    CheckpointReadError,
    InvalidArgumentError,
    MecHubError,
    UnknownModelError,
    WeightsNotFoundError,
)
from mec_hub.fileio import atomic_write
from mec_hub.progress import progress_bar, progress_enabled
from mec_hub.weights.config import (
    CONFIG_FILE,
    MODEL_FILE,
    PROJECTOR_FILE,
    ModelConfig,
    config_from_safetensors_metadata,
    read_config,
)
from mec_hub.weights.integrity import verify_sha256
from mec_hub.weights.reach import unreachable
from mec_hub.weights.record import ModelRecord
from mec_hub.weights.registry import is_registered, model_info, unknown_model_message
from mec_hub.weights.tensors import read_safetensors_metadata

HF_PREFIX = "hf-hub:"
BUNDLED_PREFIX = "bundled:"
#: The spec meaning "the model's own published weights", as torchvision's ``weights="DEFAULT"``.
DEFAULT_WEIGHTS = "DEFAULT"


@dataclass(frozen=True)
class WeightsSpec:
    """A parsed location of weights (what ``parse_weights_spec`` makes of a string)."""

    kind: str  # "default" | "registry" | "bundled" | "file" | "folder" | "hf-hub" | "url"
    value: str
    revision: str | None = None

    def __str__(self) -> str:
        if self.kind == "hf-hub":
            return f"{HF_PREFIX}{self.value}" + (f"@{self.revision}" if self.revision else "")
        if self.kind == "bundled":
            return f"{BUNDLED_PREFIX}{self.value}"
        return self.value


@dataclass(frozen=True)
class LocalWeights:
    """Verified local files, ready to load, and the description to build their model from."""

    model_file: Path
    projector_file: Path | None
    config: ModelConfig
    origin: str
    sha256: str


def split_revision(repo: str) -> tuple[str, str | None]:
    """``"org/name@rev"`` -> ``("org/name", "rev")``, the id held to huggingface_hub's own rules."""
    repo_id, sep, revision = repo.partition("@")
    if not repo_id or (sep and not revision):
        raise InvalidArgumentError(f"bad Hugging Face repo id {repo!r}: expected org/name or org/name@revision")
    check_repo_id(repo_id)
    return repo_id, revision or None


def check_repo_id(repo_id: str) -> str:
    """``repo_id`` if the Hub would accept it (huggingface_hub's validator), else a one-line error."""
    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        reason = str(exc).split("\n", 1)[0]
        raise InvalidArgumentError(f"bad Hugging Face repo id {repo_id!r}: {reason}") from None
    return repo_id


def is_default_weights(spec: object) -> bool:
    """Whether ``spec`` is ``"DEFAULT"``: the model's own published weights (for no model named,
    the default model's), exactly as if no weights were given. Only the string: a path is a path."""
    return isinstance(spec, str) and spec == DEFAULT_WEIGHTS


def parse_weights_spec(spec: str | os.PathLike[str]) -> WeightsSpec:
    """What a weights spec names (see the module docstring); ``"DEFAULT"`` is kind ``"default"``,
    which each caller resolves to the published location of the model it loads."""
    if not isinstance(spec, str | os.PathLike):
        raise TypeError(
            f"weights must be a str or os.PathLike (a model name, file, folder, hf-hub:org/name, URL "
            f"or {DEFAULT_WEIGHTS!r}), not {type(spec).__name__}: {spec!r}"
        )
    if is_default_weights(spec):
        return WeightsSpec("default", DEFAULT_WEIGHTS)
    text = os.fspath(spec)
    if text.startswith(HF_PREFIX):
        repo_id, revision = split_revision(text[len(HF_PREFIX) :])
        return WeightsSpec("hf-hub", repo_id, revision)
    if text.startswith(BUNDLED_PREFIX):
        return WeightsSpec("bundled", text[len(BUNDLED_PREFIX) :])
    if urlparse(text).scheme in ("https", "http"):
        return WeightsSpec("url", text)
    path = Path(text).expanduser()
    if path.is_dir():
        return WeightsSpec("folder", str(path))
    if path.is_file():
        if path.suffix != ".safetensors":
            raise CheckpointReadError(
                f"{path}: weights must be a .safetensors file or a folder with {CONFIG_FILE}; "
                f"convert a pickled checkpoint first with `mec-hub convert {path} --out DIR`"
            )
        return WeightsSpec("file", str(path))
    if is_registered(text):
        return WeightsSpec("registry", text)
    if os.sep in text or "/" in text or text.endswith(".safetensors"):
        raise WeightsNotFoundError(f"weights not found: no file or folder {text!r}")
    raise UnknownModelError(unknown_model_message(text))


def record_location(record: ModelRecord) -> WeightsSpec:
    """Where a registry model's weights are fetched from: its override, else its first published location.

    A published location that names no fixed set of bytes (no SHA-256 and no Hub revision: a
    model not published yet) is refused before any request, with what to do instead.
    """
    locations = record.locations()
    override = record.source_override()
    if not locations or (override is None and not record.pinned):
        where = f" ({locations[0]} is pinned to neither a revision nor a SHA-256)" if locations else ""
        raise WeightsNotFoundError(
            f"model {record.name!r} has no published weights to download yet{where}. Convert the "
            f"official checkpoint with `mec-hub convert CHECKPOINT --out DIR`, then pass weights=DIR "
            f"or set {record.source_env_var}=DIR.",
            arguments=("weights",),
        )
    return parse_weights_spec(locations[0])


def location_config(spec: WeightsSpec) -> ModelConfig:
    """The description at a local location (folder, bundled, ``.safetensors`` file), without reading weights."""
    if spec.kind in ("folder", "bundled"):
        return read_config(Path(spec.value) if spec.kind == "folder" else bundled_folder(spec.value))
    if spec.kind == "file":
        return _config_beside(Path(spec.value), origin=str(spec))
    raise InvalidArgumentError(
        f"{spec}: the architecture of random weights comes from a model name or a local folder or "
        f".safetensors file, not from a download; pass the model name, or download the folder first"
    )


def default_cache_dir() -> Path:
    """Cache for URL downloads (``MEC_HUB_CACHE``, else ``$XDG_CACHE_HOME/mec_hub``)."""
    if os.environ.get("MEC_HUB_CACHE"):
        return Path(os.environ["MEC_HUB_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "mec_hub"


def _offline_reason() -> str | None:
    """Why nothing may be downloaded: huggingface_hub's ``HF_HUB_OFFLINE`` (its own constant) or ``MEC_HUB_OFFLINE``."""
    if constants.HF_HUB_OFFLINE:
        return "offline mode is on (HF_HUB_OFFLINE=1)"
    if os.environ.get("MEC_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return "offline mode is on (MEC_HUB_OFFLINE=1)"
    return None


_COMMIT = re.compile(r"[0-9a-f]{40}")


def _not_cached_message(what: str, name: str | None, *, why: str | None = None, repo_id: str | None = None) -> str:
    """What to do about ``what`` missing from the cache: ``why`` (offline mode, or the server that cannot
    be reached and why) decides the advice; ``None`` when the reason is not known. ``repo_id``: a Hub file."""
    fetch = f"`mec-hub download {name}`" if name else "the same command"
    folder = f" (a folder: `hf download {repo_id} --local-dir DIR`)" if repo_id else ""
    if why is not None and why.startswith("offline mode"):
        return (
            f"{what} is not in the local cache, and {why}: nothing is downloaded. Run {fetch} once while "
            f"online, or pass local weights with weights=PATH{folder}."
        )
    if why is not None:
        offline = " (HF_HUB_OFFLINE=1 then loads it without asking the network)" if repo_id else ""
        return (
            f"{what} cannot be downloaded: {why}, and no copy is cached. Run {fetch} on a connected machine "
            f"and copy its cache here{offline}, or pass local weights with weights=PATH{folder}."
        )
    return (
        f"{what} is not in the local cache and cannot be downloaded (offline, or the server cannot be "
        f"reached). Run {fetch} once while online, or pass local weights with weights=PATH{folder}."
    )


def _hub_offline_reason(
    repo_id: str,
    revision: str | None,
    filenames: tuple[str, ...],
    *,
    cache_dir: str | os.PathLike[str] | None,
    endpoint: str | None,
) -> str | None:
    """Why the Hub is not to be asked for ``filenames`` (they then come from the cache alone), or ``None``.

    Offline mode (huggingface_hub's ``HF_HUB_OFFLINE``, or ``MEC_HUB_OFFLINE``) asks nothing; files
    cached at a pinned commit need nothing; otherwise the endpoint is asked once, briefly
    (``mec_hub.weights.reach``), so that an unreachable one fails at once instead of after
    huggingface_hub's retries, or falls back to the cache as huggingface_hub itself does.
    """
    offline = _offline_reason()
    if offline is not None:
        return offline
    if revision is not None and _COMMIT.fullmatch(revision):
        cached = [try_to_load_from_cache(repo_id, f, cache_dir=cache_dir, revision=revision) for f in filenames]
        if all(path is not None for path in cached):
            return "every file is cached at this commit"
    base = endpoint or constants.ENDPOINT
    why = unreachable(hf_hub_url(repo_id, MODEL_FILE, revision=revision, endpoint=endpoint))
    return None if why is None else f"the Hub at {base} cannot be reached ({why})"


def _hf_progress() -> dict[str, type]:
    """``hf_hub_download``'s bar follows mec_hub's rule (``progress_enabled``): huggingface_hub's own
    bar class (``HF_HUB_DISABLE_PROGRESS_BARS`` still silences it), disabled when the rule says no."""
    if "tqdm_class" not in inspect.signature(hf_hub_download).parameters:
        return {}  # an older huggingface_hub: its own default
    from huggingface_hub.utils import tqdm as hf_tqdm

    if progress_enabled():
        return {"tqdm_class": hf_tqdm}

    class _Silent(hf_tqdm):  # type: ignore[misc,valid-type]
        def __init__(self, *args: object, **kwargs: object) -> None:
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

    return {"tqdm_class": _Silent}


def hf_download(
    repo_id: str,
    filename: str,
    *,
    revision: str | None,
    cache_dir: str | os.PathLike[str] | None,
    endpoint: str | None,
    name: str | None = None,
    required: bool = True,
    offline: str | None = None,
) -> Path | None:
    """``filename`` of the repo, from huggingface_hub's cache or downloaded into it; ``offline`` (why the
    Hub is not asked: ``_hub_offline_reason``) takes it from the cache alone, the copy of ``revision``
    that huggingface_hub's own fallback would read, without a request of any kind."""
    where = f"{HF_PREFIX}{repo_id}" + (f"@{revision}" if revision else "")
    if offline is not None:
        # Not hf_hub_download(local_files_only=True): its request headers alone may ask the endpoint (telemetry).
        cached = try_to_load_from_cache(repo_id, filename, cache_dir=cache_dir, revision=revision)
        if isinstance(cached, str):
            return Path(cached)
        if cached is None:
            message = _not_cached_message(f"{filename} of {where}", name, why=offline, repo_id=repo_id)
            raise WeightsNotFoundError(message, arguments=("weights",))
        if not required:  # the cache knows this revision has no such file
            return None
        raise WeightsNotFoundError(f"{where} has no file {filename!r}")
    try:
        path = hf_hub_download(
            repo_id,
            filename,
            revision=revision,
            cache_dir=cache_dir,
            endpoint=endpoint,
            library_name="mec-hub",
            library_version=__version__,
            **_hf_progress(),
        )
    except LocalEntryNotFoundError:
        message = _not_cached_message(f"{filename} of {where}", name, repo_id=repo_id)
        raise WeightsNotFoundError(message, arguments=("weights",)) from None
    except RevisionNotFoundError:
        raise WeightsNotFoundError(f"{where}: revision {revision!r} does not exist") from None
    except RepositoryNotFoundError:
        raise WeightsNotFoundError(
            f"{where}: repository not found (or private: log in with `hf auth login` or set HF_TOKEN)"
        ) from None
    except EntryNotFoundError:
        if not required:
            return None
        raise WeightsNotFoundError(f"{where} has no file {filename!r}") from None
    except HfHubHTTPError as exc:
        raise WeightsNotFoundError(f"{where}: download of {filename} failed: {exc}") from None
    return Path(path)


def _http_download(url: str, target: Path) -> None:
    """``url``'s body into ``target``, published only when every byte the server announced has arrived.

    Written here rather than through ``torch.hub.download_url_to_file``: that opens the URL with no
    timeout, so a server that stops sending mid-file holds the run forever, and a connection closed
    early surfaces as ``http.client.IncompleteRead``. Here every read waits at most
    ``HF_HUB_DOWNLOAD_TIMEOUT`` seconds (huggingface_hub's per-read timeout, 10 s by default: one
    setting for both kinds of download), and a short body is an error, never a cached file.
    """
    timeout = float(constants.HF_HUB_DOWNLOAD_TIMEOUT)
    request = urllib.request.Request(url, headers={"User-Agent": f"mec-hub/{__version__}"})

    def write(tmp: Path) -> None:
        with urllib.request.urlopen(request, timeout=timeout) as response, open(tmp, "wb") as out:
            announced = response.headers.get("Content-Length")
            total = int(announced) if announced is not None and announced.isdigit() else None
            received = 0
            with progress_bar(total=total, desc=target.name, unit="B", unit_scale=True, unit_divisor=1024) as bar:
                while chunk := response.read(1 << 20):
                    out.write(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
            if total is not None and received != total:
                raise http.client.IncompleteRead(b"", total - received)

    atomic_write(target, write)


def url_download(url: str, *, cache_dir: str | os.PathLike[str] | None, name: str | None = None) -> Path:
    """Download ``url`` once into the cache; later calls (and offline runs) reuse the cached file."""
    filename = Path(urlparse(url).path).name or "weights.safetensors"
    if not filename.endswith(".safetensors"):
        raise CheckpointReadError(f"{url}: only .safetensors files are loaded from a URL (no pickles)")
    folder = Path(cache_dir or default_cache_dir()) / "urls" / hashlib.sha256(url.encode()).hexdigest()[:16]
    target = folder / filename
    if target.is_file():
        return target
    why = _offline_reason()
    if why is None and (reason := unreachable(url)) is not None:
        why = f"the server {urlparse(url).netloc} cannot be reached ({reason})"  # at once, not after retries
    if why is not None:
        raise WeightsNotFoundError(_not_cached_message(url, name, why=why), arguments=("weights",))
    try:
        _http_download(url, target)
    except urllib.error.HTTPError as exc:
        raise WeightsNotFoundError(f"{url}: HTTP {exc.code} {exc.reason}") from None
    except http.client.IncompleteRead as exc:
        missing = f"{exc.expected} bytes missing" if exc.expected else "the connection closed early"
        raise WeightsNotFoundError(
            f"{url}: the download ended before the whole file arrived ({missing}); nothing was cached, try again"
        ) from None
    except (urllib.error.URLError, http.client.HTTPException, OSError) as exc:
        if isinstance(exc, TimeoutError) or isinstance(getattr(exc, "reason", None), TimeoutError):
            raise WeightsNotFoundError(
                f"{url}: the server sent nothing for {constants.HF_HUB_DOWNLOAD_TIMEOUT:g} s; nothing was cached "
                "(on a slow link set HF_HUB_DOWNLOAD_TIMEOUT to more seconds)"
            ) from None
        raise WeightsNotFoundError(_not_cached_message(url, name) + f" ({exc})", arguments=("weights",)) from None
    return target


def bundled_folder(name: str) -> Path:
    folder = Path(str(resources.files("mec_hub") / "bundled" / name))
    if not (folder / MODEL_FILE).is_file():
        raise WeightsNotFoundError(f"bundled weights {name!r} are missing from this installation ({folder})")
    return folder


def _config_beside(model_file: Path, *, origin: str) -> ModelConfig:
    """Config of a lone safetensors file: ``config.json`` beside it, else its own header metadata."""
    if (model_file.parent / CONFIG_FILE).is_file():
        return read_config(model_file.parent)
    config = config_from_safetensors_metadata(read_safetensors_metadata(model_file, origin=origin), origin=origin)
    if config is None:
        raise CheckpointReadError(
            f"{origin}: the file does not say which architecture it holds; put it in a folder with "
            f"{CONFIG_FILE} (as `mec-hub convert` writes), or load it with a model name: load(NAME, weights=...)"
        )
    return config


def _fetch_files(
    spec: WeightsSpec,
    *,
    want_projector: bool,
    cache_dir: str | os.PathLike[str] | None,
    endpoint: str | None,
    name: str | None,
) -> tuple[Path, Path | None, ModelConfig | None, bool]:
    """Local paths of (model, projector, config found at the location, downloaded?)."""
    if spec.kind in ("folder", "bundled"):
        folder = Path(spec.value) if spec.kind == "folder" else bundled_folder(spec.value)
        model_file = folder / MODEL_FILE
        if not model_file.is_file():
            raise WeightsNotFoundError(f"{folder}: no {MODEL_FILE} in this folder")
        config = read_config(folder) if (folder / CONFIG_FILE).is_file() else None
        projector = folder / PROJECTOR_FILE
        return model_file, (projector if projector.is_file() else None), config, False
    if spec.kind == "file":
        model_file = Path(spec.value)
        projector = model_file.with_name(PROJECTOR_FILE)
        has_projector = projector.is_file() and model_file.name == MODEL_FILE
        return model_file, (projector if has_projector else None), None, False
    if spec.kind == "hf-hub":
        wanted = (CONFIG_FILE, MODEL_FILE, *((PROJECTOR_FILE,) if want_projector else ()))
        offline = _hub_offline_reason(spec.value, spec.revision, wanted, cache_dir=cache_dir, endpoint=endpoint)
        kwargs = dict(revision=spec.revision, cache_dir=cache_dir, endpoint=endpoint, name=name, offline=offline)
        config_path = hf_download(spec.value, CONFIG_FILE, required=False, **kwargs)  # type: ignore[arg-type]
        model_file = hf_download(spec.value, MODEL_FILE, **kwargs)  # type: ignore[arg-type]
        projector = hf_download(spec.value, PROJECTOR_FILE, **kwargs) if want_projector else None  # type: ignore[arg-type]
        config = read_config(config_path) if config_path else None
        assert model_file is not None
        return model_file, projector, config, True
    if spec.kind == "url":
        model_file = url_download(spec.value, cache_dir=cache_dir, name=name)
        projector = None
        if want_projector:
            projector_url = spec.value.rsplit("/", 1)[0] + "/" + PROJECTOR_FILE
            projector = url_download(projector_url, cache_dir=cache_dir, name=name)
        return model_file, projector, None, True
    raise ValueError(f"not a location: {spec}")


def _registry_terms(
    record: ModelRecord, found_config: ModelConfig | None, *, origin: str
) -> tuple[ModelConfig, dict[str, str | None], dict[str, bool]]:
    """(description, expected digest and unverified flag per file) of a registry model's files at ``origin``."""
    config = record.config
    if found_config is not None and found_config.architecture != config.architecture:
        raise MecHubError(
            f"{origin} holds a {found_config.architecture}, but model {record.name!r} is a "
            f"{config.architecture}: wrong weights for this model"
        )
    # A location's own digests still catch corruption when the registry does not know them yet.
    local = dict(found_config.files) if found_config else {}
    expected = {role: config.files.get(role) or local.get(role) for role in (MODEL_FILE, PROJECTOR_FILE)}
    unverified = {role: config.files.get(role) is None for role in (MODEL_FILE, PROJECTOR_FILE)}
    return config, expected, unverified


def check_sha256_pin(sha256: str | None) -> str | None:
    """A user's SHA-256 pin, lower-cased, or an error naming what is wrong with it."""
    if sha256 is None:
        return None
    pin = str(sha256).strip().lower()
    if len(pin) != 64 or any(c not in "0123456789abcdef" for c in pin):
        raise InvalidArgumentError(f"sha256 {sha256!r} is not a SHA-256 digest (64 hexadecimal digits)")
    return pin


def _pin_model_digest(pin: str, known: str | None, *, origin: str) -> str:
    """The digest the model file must have: the pin, which may not contradict a published one."""
    if known is not None and known.lower() != pin:
        raise InvalidArgumentError(
            f"sha256 {pin} contradicts the published SHA-256 of {MODEL_FILE} of {origin} ({known.lower()}); "
            f"drop the pin or fix it"
        )
    return pin


def fetch_weights(
    spec: WeightsSpec,
    *,
    record: ModelRecord | None = None,
    want_projector: bool = False,
    cache_dir: str | os.PathLike[str] | None = None,
    endpoint: str | None = None,
    sha256: str | None = None,
) -> LocalWeights:
    """Fetch and verify the files of ``spec``; ``record`` (a registry entry) supplies config and digests.

    ``sha256`` pins ``model.safetensors`` to the digest the caller trusts (weights no registry
    vouches for, e.g. another publisher's ``hf-hub:org/name@rev``): a file that differs is refused.
    """
    pinned = check_sha256_pin(sha256)
    name = record.name if record else None
    model_file, projector_file, found_config, downloaded = _fetch_files(
        spec, want_projector=want_projector, cache_dir=cache_dir, endpoint=endpoint, name=name
    )
    origin = str(spec)
    what = name or origin
    if record is not None:
        config, expected, unverified = _registry_terms(record, found_config, origin=origin)
    else:
        # What the files say about themselves (config.json, the safetensors header) is a claim.
        config = found_config or _config_beside(model_file, origin=origin)
        claimed = model_info(config.name) if config.name and is_registered(config.name) else None
        if claimed is not None and claimed.sha256 is not None:
            # They call themselves a registry model that has a published digest: that digest (and
            # that model's description) decides, exactly as when the model is asked for by name.
            name = what = claimed.name
            config, expected, unverified = _registry_terms(claimed, config, origin=origin)
        else:
            expected = {role: config.files.get(role) for role in (MODEL_FILE, PROJECTOR_FILE)}
            # A user's own local file need not carry a digest; a download must.
            unverified = {role: downloaded and digest is None for role, digest in expected.items()}
            if claimed is not None:
                # A registry name no published digest can check: the files' own digests still catch
                # corruption, but they load unnamed and with the loud warning.
                config = replace(config, name=None)
                unverified = dict.fromkeys(expected, True)
                what = f"{origin}, which calls itself {claimed.name!r} (a model with no published SHA-256 yet)"

    if pinned is not None:
        expected[MODEL_FILE] = _pin_model_digest(pinned, expected[MODEL_FILE], origin=name or origin)
        unverified[MODEL_FILE] = False

    if want_projector and projector_file is None:
        raise WeightsNotFoundError(f"{origin}: no {PROJECTOR_FILE} published; use head='backbone'")

    digests = {}
    for role, path in ((MODEL_FILE, model_file), (PROJECTOR_FILE, projector_file if want_projector else None)):
        if path is not None:
            digests[role] = verify_sha256(
                path,
                expected[role],
                what=f"{role} of {what}",
                remove_on_mismatch=downloaded,
                unverified=unverified[role],
            )
    return LocalWeights(
        model_file=model_file,
        projector_file=projector_file if want_projector else None,
        config=config,
        origin=origin,
        sha256=digests[MODEL_FILE],
    )
