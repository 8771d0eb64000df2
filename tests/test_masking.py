"""Credentials in URLs are masked from the URL's structure, whatever characters the password holds (issue 26,
class 5): hypothesis types passwords over the whole printable ASCII range (and beyond), puts the URL where git,
pip, uv, the harness's errors and its JSON put one, and checks the masked text is exactly the text with the user
information replaced by ``***`` (so no part of the password is left, and the host, the path and the text around
the URL are).  Before this rule the mask stopped at a quote, a bracket, a space, '#' or '|' in the password."""
from __future__ import annotations

import json
import string

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from vllm_harness.core import masking, runner

PRINTABLE = st.text(st.sampled_from(string.printable[:-5]), min_size=1, max_size=40)  # 0x20-0x7e, no \t\n\r\v\f
UNICODE = st.text(st.characters(blacklist_categories=("Cc", "Cs")), min_size=1, max_size=20)
PASSWORDS = PRINTABLE | UNICODE
USERS = st.sampled_from(["__token__", "alice", "bob.smith", "oauth2", ""])
HOSTS = st.sampled_from(["pypi.corp.example", "127.0.0.1:8443", "[::1]:9", "index", "GitHub.com"])
PATHS = st.sampled_from(["/simple", "/simple/", "/org/repo.git", "", "/simple?x=1#frag"])
SCHEMES = st.sampled_from(["https", "http", "git+https", "HTTPS"])


def _texts(url: str) -> list[str]:
    """The places a URL is printed: git, pip/uv, the harness's messages, JSON, prose with punctuation."""
    return [
        f"$ git clone --depth 1 {url} /tmp/state/src/cu124",
        f"fatal: unable to access '{url}/': The requested URL returned error: 403",
        f"Looking in indexes: {url}, https://pypi.org/simple",
        f"Looking in indexes: https://pypi.org/simple, {url}",
        f"  error: Cannot reach the index {url} for cu124.toml [torch] (timed out).",
        f"ERROR: HTTP error 401 while getting {url}/torch/\nERROR: 401 Client Error: Unauthorized for url: {url}",
        f"see ({url}).", f"<{url}>,", f"[{url}];", f'"{url}"', f"'{url}'!", url,
    ]


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scheme=SCHEMES, user=USERS, password=PASSWORDS, host=HOSTS, path=PATHS)
@example(scheme="https", user="__token__", password="a'b) c#d?e\"f\\g<h>i]j{k}l|m n", host="pypi.corp.example",
         path="/simple")
@example(scheme="https", user="bob", password="p@ss/w:rd@x.example/y", host="index", path="/simple")
@example(scheme="https", user="bob", password="a://b", host="pypi.corp.example", path="/simple")
def test_no_part_of_any_password_survives_and_the_host_does(scheme, user, password, host, path):
    url = f"{scheme}://{user}:{password}@{host}{path}"
    shown = f"{scheme}://***@{host}{path}"
    for text in _texts(url):
        assert masking.mask(text) == text.replace(url, shown)
    for obj in ({"index": url, "n": 1}, [url, "https://pypi.org/simple"]):
        for kw in ({}, {"indent": 2}, {"ensure_ascii": False}):
            assert masking.mask(json.dumps(obj, **kw)) == json.dumps(json.loads(json.dumps(obj).replace(
                json.dumps(url)[1:-1], shown)), **kw)
    assert runner.mask(url) == shown  # the runner's logs use the same rule


@settings(max_examples=200, deadline=None)
@given(token=st.text(st.sampled_from(sorted(set(string.printable[:-5]) - set("/?# "))), min_size=1, max_size=40),
       host=HOSTS, path=PATHS)
def test_a_token_alone_is_masked_up_to_the_last_at_of_the_authority(token, host, path):
    """https://TOKEN@host: a token may hold '@' and ':' (then it is read as user:password, masked the same)."""
    url = f"https://{token}@{host}{path}"
    for text in _texts(url):
        assert masking.mask(text) == text.replace(url, f"https://***@{host}{path}")


@settings(max_examples=200, deadline=None)
@given(password=st.text(st.sampled_from(string.printable[:-6].replace(" ", "") + "é"), min_size=1, max_size=30))
def test_git_scp_like_urls_lose_their_password(password):
    """user:password@host:path loses the password; a revision '@' in a path, a user alone, a mail do not."""
    url = f"deploy:{password}@github.com:org/repo.git"
    for text in (f"$ git clone {url} src", f"Cloning into 'src' from '{url}'...", f"fetch {url}\n"):
        assert masking.mask(text) == text.replace(url, "deploy:***@github.com:org/repo.git")
    for text in ("Collecting vllm @ git+https://github.com/vllm-project/vllm@v0.8.5",
                 "file:///home/me/wheels/a@b.whl", "git@github.com:org/repo.git", "mail me@example.com: x",
                 "https://pypi.org/simple/torch/ and https://download.pytorch.org/whl/cu124"):
        assert masking.mask(text) == text


def test_credentials_split_for_a_header_are_the_whole_password():
    bare, user, password = masking.strip_credentials("https://al%40ice:p@ss/w rd@pypi.corp.example/simple")
    assert (bare, user, password) == ("https://pypi.corp.example/simple", "al@ice", "p@ss/w rd")


@pytest.mark.parametrize("password", ["S3#C?RET", "S3]CRET", 'S3 C"RET', "S3CRET@", "S3/CRET"])
def test_compat_refresh_with_a_credentialed_index_url_is_one_message_without_the_token(harness, tmp_path, password):
    """A password typed as is (not percent-encoded) crashed the refresh inside http.client, and the traceback
    printed it; now the URL is refused before any request, the password nowhere in the output."""
    rc, out, err = harness("compat", "--refresh", "--index-url", f"https://__token__:{password}@127.0.0.1:9/simple",
                           "--out", tmp_path / "lock.toml")
    assert rc == 2 and err.count("error:") == 1 and "Traceback" not in err, err
    assert "--index-url https://***@127.0.0.1:9/simple" in err and "Percent-encode" in err
    assert "S3" not in out + err and "CRET" not in out + err and not (tmp_path / "lock.toml").exists()


@pytest.mark.parametrize("url", ["https://__token__:S3CRET@127.0.0.1:x/simple", "https://__token__:S3CRET@/simple"])
def test_compat_refresh_refuses_an_index_url_without_a_host_or_port_before_any_request(harness, tmp_path, url):
    rc, out, err = harness("compat", "--refresh", "--index-url", url, "--out", tmp_path / "lock.toml")
    assert rc == 2 and err.count("error:") == 1 and "S3CRET" not in out + err, err
