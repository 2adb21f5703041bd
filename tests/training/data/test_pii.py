"""RedactPII: each type redacted with its placeholder and counted; version strings, dates and hashes left alone."""
import pytest
from datatrove.data import Document

from training.data.curate.pii import PII_TYPES, RedactPII

JWT = ("eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0."
       "dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U")


@pytest.mark.parametrize("text, expected, kind", [
    ("Write to jane.doe@mail.example.com today.", "Write to <EMAIL> today.", "email"),
    ("Server 8.8.4.4 answered.", "Server <IP_ADDRESS> answered.", "ip_address"),
    ("ping 2001:4860:4860::8888 now", "ping <IP_ADDRESS> now", "ip_address"),
    ("Call (555) 123-4567.", "Call <PHONE>.", "phone"),
    ("Call +44 20 7946 0958.", "Call <PHONE>.", "phone"),
    ("key AKIAIOSFODNN7EXAMPLE here", "key <AWS_ACCESS_KEY> here", "aws_access_key"),
    ("GH=ghp_" + "a1B2" * 9, "GH=<GITHUB_TOKEN>", "github_token"),
    ("slack xoxb-1234567890-abcdefghij", "slack <SLACK_TOKEN>", "slack_token"),
    (f"Authorization: Bearer {JWT}", "Authorization: Bearer <JWT>", "jwt"),
    ('api_key = "sk-abc123def456ghi789"', 'api_key = "<SECRET>"', "secret"),
    ('{"client_secret": "Zx9aQ12bnm34kl56"}', '{"client_secret": "<SECRET>"}', "secret"),
    ("-----BEGIN RSA PRIVATE KEY-----\nMIIEpAIBAAKCAQEA\n-----END RSA PRIVATE KEY-----\nbye",
     "<PRIVATE_KEY>\nbye", "private_key"),
])
def test_each_type_is_redacted_and_counted(text, expected, kind):
    step = RedactPII()
    doc = next(step.run(iter([Document(text=text, id="d")])))
    assert doc.text == expected
    assert doc.metadata["pii"] == {kind: 1}
    assert step.stats[f"pii_{kind}"].total == 1


@pytest.mark.parametrize("text", [
    "version 1.2.3.4 released", "pip install foo==1.2.3.4", "v1.2.3.4", "build 1.2.3.4.5", "1.2.3.4rc1",
    "pkg@1.2.3 and icon@2x.png",                               # npm pins, image names: not addresses
    "private 192.168.0.1, loopback 127.0.0.1 and ::1",       # not personal data (datatrove's public-only rule)
    "dates 2024-01-15, 15.01.2024, 2024/01/15 at 12:30:45",
    "sha1 3f786850e387550fdab836ed7e6dc881de23001b",
    "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
    "xs[::2], ys[1::2], std::vector<int>",                   # slices parse as IPv6 addresses
    'eos_token = "<|endoftext|>"; password = "changeme"; secret_key = None',
    "numbers 100 200 3000 and 12345678901",
])
def test_no_false_positives(text):
    step = RedactPII()
    doc = next(step.run(iter([Document(text=text, id="d")])))
    assert doc.text == text and "pii" not in doc.metadata


def test_counts_per_type_in_one_document():
    text = "a@b.org, c@d.net, 8.8.8.8 and AKIAIOSFODNN7EXAMPLE"
    assert RedactPII().redact(text)[1] == {"email": 2, "ip_address": 1, "aws_access_key": 1}


def test_kinds_selects_types_and_rejects_unknown():
    assert RedactPII(kinds=("email",)).format("a@b.org 8.8.8.8") == "<EMAIL> 8.8.8.8"
    with pytest.raises(ValueError, match="kinds.*ssn"):
        RedactPII(kinds=("ssn",))
    assert set(PII_TYPES) >= {"email", "ip_address", "phone", "secret"}
