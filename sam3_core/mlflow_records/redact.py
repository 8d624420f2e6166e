"""Keep credentials out of MLflow: params, tags and text artifacts pass through here first.

A tracking server is read by everyone on the team, and whatever reaches it stays there, so
masking errs on the side of hiding: a value is masked when its key names a credential, or
when the value itself looks like one wherever it sits.
"""

from __future__ import annotations

import itertools
import logging
import math
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

MASK = "***"
# MLflow's longest param value (mlflow.utils.validation.MAX_PARAM_VAL_LENGTH; a test keeps them equal).
# A constant here: masking runs on the component's own path, which must not import mlflow.
MAX_PARAM_VALUE_LENGTH = 6000

_SECRET_WORDS = frozenset(
    {
        "secret",
        "secrets",
        "password",
        "passwd",
        "pwd",
        "passphrase",
        "token",
        "credential",
        "credentials",
        "authorization",
        "apikey",
        "cookie",
    }
)
# Adjacent words that together name a credential (`access_key`, `keyId`, `api-key`).
_SECRET_PAIRS = frozenset(
    {
        ("access", "key"),
        ("key", "id"),
        ("api", "key"),
        ("private", "key"),
        ("secret", "key"),
        ("session", "key"),
        ("signing", "key"),
        ("auth", "header"),
    }
)
# Hex digests under these words are lineage (checksums, commits, ids), not secrets.
_DIGEST_WORDS = frozenset({"sha", "sha1", "sha256", "digest", "checksum", "hash", "commit", "id", "version"})
_WORD = re.compile(r"[A-Z]?[a-z]+|[A-Z]+(?![a-z])|\d+")

_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    # user:password@ in any URL keeps the user and hides the password (which may hold '/', as AWS secrets do).
    # (The scheme is bounded and must start a word: an unbounded one made long letter runs quadratic.)
    (
        re.compile(r"(?P<head>(?<![A-Za-z0-9+.-])[A-Za-z][A-Za-z0-9+.-]{0,31}://[^/\s:@]+):[^\s@]+@"),
        rf"\g<head>:{MASK}@",
    ),
    (re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----.*?-----END [A-Z ]*PRIVATE KEY-----", re.S), MASK),
    # JSON Web Tokens: base64url header and payload both start with '{"'.
    (re.compile(r"\beyJ[A-Za-z0-9_-]+\.eyJ[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*"), MASK),
    # AWS access key ids (long-lived AKIA, temporary ASIA, and the other documented prefixes).
    (re.compile(r"(?<![A-Z0-9])(?:AKIA|ASIA|ABIA|ACCA|AGPA|AIDA|AIPA|ANPA|ANVA|AROA)[A-Z0-9]{16}(?![A-Z0-9])"), MASK),
    # Well-known token prefixes: GitHub, GitLab, Hugging Face, OpenAI-style, Slack.
    (re.compile(r"\b(?:gh[pousr]_|github_pat_|glpat-|hf_|sk-|xox[abpr]-)[A-Za-z0-9_-]{16,}"), MASK),
    (re.compile(r"(?i)\b(?P<scheme>bearer|basic)\s+[A-Za-z0-9._~+/=-]{8,}"), rf"\g<scheme> {MASK}"),
)
# Opaque high-entropy strings: AWS secret keys (40 chars, may hold / and +) and long tokens.
_OPAQUE = re.compile(r"(?<![A-Za-z0-9+/=_-])(?:[A-Za-z0-9+/]{40}|[A-Za-z0-9_-]{32,})(?![A-Za-z0-9+/=_-])")
_HEX = re.compile(r"^[0-9a-fA-F]{32,}$")
_MIN_ENTROPY_BITS = 4.0


def _words(key: str) -> list[str]:
    return [word.lower() for word in _WORD.findall(key)]


def is_secret_key(key: str) -> bool:
    """True when a (dotted) key names a credential: `aws.secret_access_key`, `hub.apiKey`, `auth.token`."""
    words = _words(key)
    return bool(_SECRET_WORDS.intersection(words)) or any(pair in _SECRET_PAIRS for pair in itertools.pairwise(words))


def _entropy(text: str) -> float:
    counts = Counter(text)
    return -sum(n / len(text) * math.log2(n / len(text)) for n in counts.values())


def _looks_random(token: str) -> bool:
    """Mixed case and digits with high per-character entropy: a key, not a word or a path."""
    classes = (any(c.islower() for c in token), any(c.isupper() for c in token), any(c.isdigit() for c in token))
    return all(classes) and _entropy(token) >= _MIN_ENTROPY_BITS


# Credentials this process was given (passwords of URIs on its command line, secret environment
# variables): masked wherever they appear, also where a library repeats them in its own words
# (`Invalid bucket name "KEY:SECRET@bucket"`). Longest first, so a secret containing another is masked whole.
_KNOWN: list[str] = []
_USERINFO = re.compile(r"[A-Za-z][A-Za-z0-9+.-]{0,31}://(?P<user>[^/\s:@]+):(?P<password>[^\s@]+)@")
# shorter environment values are not masked everywhere: they would hit ordinary words and paths
_MIN_ENV_SECRET = 8


def remember_secrets(texts: Iterable[str] = (), environ: Mapping[str, str] | None = None) -> None:
    """Mask from now on the passwords of `user:password@` URIs in `texts` (a command line) and the values
    of environment variables whose names say credential (`AWS_SECRET_ACCESS_KEY`, `*_TOKEN`, ...)."""
    found = {m["password"] for text in texts for m in _USERINFO.finditer(str(text))}
    for name, value in (environ or {}).items():
        if is_secret_key(name) and len(value) >= _MIN_ENV_SECRET:
            found.add(value)
    _KNOWN[:] = sorted(set(_KNOWN) | found, key=len, reverse=True)


def redact_text(text: str) -> str:
    """Mask everything in free text that looks like a credential, and every credential this process knows."""
    for secret in _KNOWN:
        text = text.replace(secret, MASK)
    for pattern, replacement in _PATTERNS:
        text = pattern.sub(replacement, text)
    return _OPAQUE.sub(lambda m: MASK if _looks_random(m.group(0)) else m.group(0), text)


def describe_error(exc: BaseException) -> str:
    """An exception for a log line or a message: first line, bounded, credentials masked.

    MLflow puts the full request URL, with any `user:password@` of the tracking URI, in its errors.
    """
    lines = str(exc).strip().splitlines()
    return redact_text(lines[0][:200] if lines else type(exc).__name__)


def redact_value(key: str, value: Any) -> Any:
    """One leaf of a config or a tag: masked whole when its key or its shape says credential."""
    if is_secret_key(key) and value not in (None, "") and not isinstance(value, bool):
        return MASK
    if not isinstance(value, str):
        return value
    if _HEX.match(value) and not _DIGEST_WORDS.intersection(_words(key)):
        return MASK
    return redact_text(value)


def redact_tree(obj: Any, key: str = "") -> Any:
    """A nested config / JSON document with every secret leaf masked (keys give the context)."""
    if isinstance(obj, Mapping):
        return {k: redact_tree(v, f"{key}.{k}" if key else str(k)) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [redact_tree(v, key) for v in obj]
    return redact_value(key, obj)


def truncate(value: str) -> str:
    """MLflow refuses longer values; keep the head and say that it was cut."""
    marker = "...[truncated]"
    limit = MAX_PARAM_VALUE_LENGTH
    return value if len(value) <= limit else value[: limit - len(marker)] + marker


def redact_params(flat: Mapping[str, Any]) -> dict[str, str]:
    """Flattened config -> MLflow params: masked, stringified, cut to MLflow's length limit."""
    return {key: truncate(str(redact_tree(value, key))) for key, value in flat.items()}


class RedactingFilter(logging.Filter):
    """Masks credentials in a log record's final text (MLflow puts `user:password@` URLs in its lines)."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except (TypeError, ValueError):
            return True
        masked = redact_text(message)
        if masked != message:
            record.msg, record.args = masked, None
        return True


# MLflow's loggers write through their own handler (propagation off); urllib3 logs the URLs it retries.
_MLFLOW_LOGGERS = ("mlflow", "urllib3.connectionpool")


def mask_console() -> None:
    """Route MLflow's own console lines through `redact_text`, as ours are. Idempotent.

    The filter sits on the handlers of MLflow's logger (records of every `mlflow.*` logger
    pass them) and on the loggers themselves (records that propagate to the root's handlers).
    Importing mlflow (this module does) has already set MLflow's handler up.
    """
    for name in _MLFLOW_LOGGERS:
        logger = logging.getLogger(name)
        for target in [logger, *logger.handlers]:
            if not any(isinstance(f, RedactingFilter) for f in target.filters):
                target.addFilter(RedactingFilter())
