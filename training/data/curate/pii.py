"""PII and secret redaction for the curate stage, as a datatrove formatter.

Each match is replaced by a typed placeholder (`<EMAIL>`, `<IP_ADDRESS>`, `<PHONE>`, `<PRIVATE_KEY>`,
`<AWS_ACCESS_KEY>`, `<GITHUB_TOKEN>`, `<SLACK_TOKEN>`, `<JWT>`, `<SECRET>`), counted per type with `stat_update`
(`pii_<type>`) and recorded on the document as `doc.metadata["pii"] = {type: count}` (only when something was found).

Built on datatrove's `PIIFormatter`: its e-mail regex and its IPv4 regex with the "public addresses only" validator
(private, loopback and documentation ranges are not personal data). Added here:
- word boundaries around IPv4 (datatrove's regex also matches inside `11.22.33.44.55`) and the version rule below;
- IPv6 (candidate regex, then `ipaddress` validation, public addresses only), phone numbers, and secrets;
- an e-mail's top-level domain must be letters, so `pkg@1.2.3` (npm-style pins) is not an address, and neither is a
  retina image name (`icon@2x.png`: a domain starting with `<digits>x.`).

Version rule (the `1.2.3.4` trap): a dotted quad is not an address when it is glued to a longer dotted or word
sequence (`v1.2.3.4`, `1.2.3.4.5`, `1.2.3.4rc1`, `1.2.3.4-beta`), or when a version cue comes shortly before it on the same
line: `version`, `release`, `==`, `>=`, `<=`, `~=`, `!=`, `@`, a `v` prefix. Dates (`2024-01-15`, `15.01.2024`),
times (`12:30:45`) and hex digests (`sha256:ab12...`, 40/64-hex strings) never match any pattern (tested).
"""
from __future__ import annotations

import ipaddress
import re
from collections import Counter
from typing import Callable

from datatrove.data import DocumentsPipeline
from datatrove.pipeline.formatters.base import BaseFormatter
from datatrove.utils.typeshelper import StatHints

# datatrove's PIIFormatter e-mail regex (RFC 5322-ish), with the final label required to be letters (a real TLD).
_EMAIL = (r"\b[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*@"
          r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?\.)+[A-Za-z]{2,63}\b")
_RETINA_IMAGE = re.compile(r"@\d+x\.")
_OCTET = r"(?:25[0-5]|2[0-4][0-9]|[01]?[0-9][0-9]?)"
_IPV4 = rf"(?<![\w.]){_OCTET}(?:\.{_OCTET}){{3}}(?![\w-]|\.\d)"
_VERSION_CUE = re.compile(r"(?:version|release|==|>=|<=|~=|!=|@|\bv)\s*[^\n]{0,12}$", re.IGNORECASE)
# Candidate only: any run of hex groups with at least two colons; `ipaddress` decides (rejects `std::vector`, times),
# and at least three non-empty groups are required, because Python slices `x[::2]`, `x[1::2]` parse as global IPv6.
_IPV6 = r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}(?:[0-9A-Fa-f]{1,4}|(?:\d{1,3}\.){3}\d{1,3})?(?![\w:])"
# North American (555) 123-4567 / 555-123-4567 / 555.123.4567 (one separator kind), or international +CC ...
# with 9-15 digits in all (ITU-T E.164's maximum is 15).
_PHONE = (r"(?<![\w.+-])(?:\(\d{3}\)\s?\d{3}-\d{4}|\d{3}([-.])\d{3}\1\d{4})(?![\w-]|\.\d)"
          r"|(?<![\w+])\+\d{1,3}(?:[ .-]?\(?\d{1,4}\)?){2,5}(?![\w-]|\.\d)")
_PRIVATE_KEY = (r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY-----"
                r"(?:[\s\S]{0,20000}?-----END (?:[A-Z0-9]+ )*PRIVATE KEY-----|(?:[ \t]*\r?\n[A-Za-z0-9+/=]{8,})*)")
# (A block cut before its END line loses the base64 lines that follow it.)
# AWS IAM unique-identifier prefixes for access keys (AKIA long-term, ASIA temporary), 20 upper-case characters.
_AWS_ACCESS_KEY = r"\b(?:AKIA|ASIA|ABIA|ACCA)[0-9A-Z]{16}\b"
# GitHub token formats (github.blog 2021-04-05): ghp_/gho_/ghu_/ghs_/ghr_ + 36 base62, and fine-grained github_pat_.
_GITHUB_TOKEN = r"\b(?:gh[pousr]_[A-Za-z0-9]{36}|github_pat_[A-Za-z0-9_]{22,255})\b"
_SLACK_TOKEN = r"\bxox[abposr]-[A-Za-z0-9-]{10,}"
_JWT = r"\beyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}"
# `api_key = "..."`, `"client_secret": "..."`, `PASSWORD=...`: the value is redacted, the name kept. The value must look
# like a credential (>= 12 characters of a key alphabet with a letter and a digit), so `token = "<|endoftext|>"`,
# `password = "changeme"` and `secret_key = None` stay.
# The match starts at the keyword (the rest of the name is left alone anyway): a leading `[\w.-]*` made it 3x slower.
_ASSIGNED_SECRET = (r"(?i)((?:api[_-]?key|secret|token|passw(?:or)?d|access[_-]?key|auth[_-]?key)[\w-]*"
                    r"[\"']?\s*(?::|=|=>)\s*[\"']?)([A-Za-z0-9_\-+/=.]{12,200})(?=[\"'\s,;]|$)")


def _public_ip(text: str) -> bool:
    try:
        return ipaddress.ip_address(text).is_global
    except ValueError:
        return False


def _hex_groups(text: str) -> int:
    return sum(1 for group in text.split(":") if group)


def _has_letter_and_digit(value: str) -> bool:
    return any(c.isalpha() for c in value) and any(c.isdigit() for c in value)


def _e164_length(text: str) -> bool:
    return 9 <= sum(c.isdigit() for c in text) <= 15


class _Pattern:
    """One PII type: a compiled regex, an optional validator of the match, and which group to replace."""

    def __init__(self, kind: str, regex: str, validate: Callable[[re.Match], bool] | None = None, group: int = 0,
                 needs: str = ""):
        self.kind, self.placeholder = kind, f"<{kind.upper()}>"
        self.regex, self.validate, self.group = re.compile(regex), validate, group
        self.needs = needs   # a substring every match contains: a C-speed `in` skips most documents

    def redact(self, text: str, counts: Counter) -> str:
        if self.needs not in text:
            return text

        def replace(match: re.Match) -> str:
            if self.validate and not self.validate(match):
                return match.group(0)
            counts[self.kind] += 1
            if self.group:   # keep the text around the redacted group (e.g. the variable name)
                start, end = match.span(self.group)
                whole_start = match.start()
                return match.group(0)[: start - whole_start] + self.placeholder + match.group(0)[end - whole_start:]
            return self.placeholder

        return self.regex.sub(replace, text)


def _not_a_version(match: re.Match) -> bool:
    line_start = match.string.rfind("\n", 0, match.start()) + 1
    before = match.string[max(line_start, match.start() - 24): match.start()]
    return _public_ip(match.group(0)) and not _VERSION_CUE.search(before)


# Order matters: multi-line keys and structured tokens first, so that later, looser patterns (generic assignments,
# phone numbers) never see their pieces; a placeholder contains nothing any pattern matches.
PATTERNS = (
    _Pattern("private_key", _PRIVATE_KEY, needs="PRIVATE KEY-----"),
    _Pattern("jwt", _JWT, needs="eyJ"),
    _Pattern("github_token", _GITHUB_TOKEN, needs="_"),
    _Pattern("slack_token", _SLACK_TOKEN, needs="xox"),
    _Pattern("aws_access_key", _AWS_ACCESS_KEY),
    _Pattern("secret", _ASSIGNED_SECRET, lambda m: _has_letter_and_digit(m.group(2)), group=2),
    _Pattern("email", _EMAIL, lambda m: not _RETINA_IMAGE.search(m.group(0)), needs="@"),
    _Pattern("ip_address", _IPV6, lambda m: _public_ip(m.group(0)) and _hex_groups(m.group(0)) >= 3, needs=":"),
    _Pattern("ip_address", _IPV4, _not_a_version, needs="."),
    _Pattern("phone", _PHONE, lambda m: _e164_length(m.group(0))),
)
PII_TYPES = tuple(dict.fromkeys(p.kind for p in PATTERNS))


class RedactPII(BaseFormatter):
    """Replace personal data and credentials with typed placeholders; `kinds` selects a subset of `PII_TYPES`."""

    name = "🕵 Redact PII"

    def __init__(self, kinds: tuple[str, ...] = PII_TYPES):
        super().__init__()
        unknown = sorted(set(kinds) - set(PII_TYPES))
        if unknown:
            raise ValueError(f"RedactPII.kinds: unknown type(s) {unknown}; known: {list(PII_TYPES)}")
        self.kinds = tuple(kinds)

    def redact(self, text: str) -> tuple[str, Counter]:
        counts: Counter = Counter()
        for pattern in PATTERNS:
            if pattern.kind in self.kinds:
                text = pattern.redact(text, counts)
        return text, counts

    def format(self, text: str) -> str:
        return self.redact(text)[0]

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        for doc in data:
            self.stat_update(StatHints.total)
            with self.track_time():
                doc.text, counts = self.redact(doc.text if isinstance(doc.text, str) else "")
            if counts:
                doc.metadata["pii"] = dict(counts)
                self.stat_update("redacted_docs")
                for kind, count in counts.items():
                    self.stat_update(f"pii_{kind}", value=count)
            yield doc
