"""A subscriber's name shows in the To header exactly as configured.

A name holding an RFC 2047 encoded word (``name = "=?utf-8?q?Mallory?="``) would be shown
decoded by mail clients (and by the email package): another name than the one typed, or a
spoof. The config refuses it at load, naming the key and the text to write instead; every
name it accepts is parsed back from the rendered message as typed.
"""

from __future__ import annotations

import email
import email.policy
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from digest.config import SUBSCRIBER_KEYS, load_config
from digest.errors import ConfigError
from digest.render import one_line, render_digest_bytes

from .test_render_bytes import NOW, SMTP, digest, paper


def config_with_name(tmp_path: Path, name: str) -> Path:
    path = tmp_path / "digest.toml"
    escaped = name.replace("\\", "\\\\").replace('"', '\\"')
    path.write_text('[smtp]\nsink = "outbox"\n\n[[subscribers]]\nemail = "mira@lab.example.net"\n'
                    f'name = "{escaped}"\n', encoding="utf-8")
    return path


def shown_name(name: str) -> str:
    """The To header's display name, as the email package reads the rendered message."""
    data = render_digest_bytes(digest(paper(1), name=name), SMTP, now=NOW).data
    message = email.message_from_bytes(data, policy=email.policy.default)
    [address] = message["To"].addresses
    assert address.addr_spec == "mira@lab.example.net"
    return str(address.display_name)


def test_rendered_as_is_an_encoded_word_in_a_name_shows_decoded() -> None:
    # Why the config refuses it: the name the reader would see is not the one configured.
    assert shown_name("=?utf-8?q?Mallory?=") == "Mallory"


@pytest.mark.parametrize(("name", "hint"), [
    ("=?utf-8?q?Mallory?=", 'write "Mallory" instead'),
    ("Mira =?utf-8?b?T2thZm9y?=", 'write "Mira Okafor" instead'),
    ('"=?utf-8?q?Mallory?="', "Mallory"),  # quoted: clients decode it all the same
    ("=?nonsense?x?abc?=", "write the name as plain text"),
])
def test_a_name_holding_an_encoded_word_is_refused_naming_the_key(
        tmp_path: Path, name: str, hint: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(config_with_name(tmp_path, name))
    text = str(caught.value)
    assert "subscribers[0].name" in text and "RFC 2047 encoded word" in text
    assert hint in text
    assert "Traceback" not in text


@pytest.mark.parametrize("name", ["Mira Okafor", "Zoë Ängström", "A =? B", "what?=no",
                                  "Okafor, Mira (lab)", '"Mira" <mira@example.org>'])
def test_an_accepted_name_shows_as_typed(tmp_path: Path, name: str) -> None:
    [subscriber] = load_config(config_with_name(tmp_path, name)).subscribers
    assert subscriber.name == name
    assert shown_name(subscriber.name) == name


# Names made of the pieces of encoded words and of addresses, besides ordinary text; ASCII:
# a long non-ASCII name is folded into several encoded words, which the email package's
# parser (not mail clients) joins with a space, whatever the name holds.
_PIECES = st.sampled_from(["=?", "?=", "?q?", "?b?", "utf-8", "Mallory", "=41", " ", '"', ",",
                           "<", ">", "@", "(", ")", "Mira"])
_NAMES = st.one_of(
    st.lists(_PIECES, max_size=12).map("".join),
    st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=60),
)


@settings(max_examples=150, deadline=None)
@given(name=_NAMES)
def test_every_name_the_config_accepts_is_parsed_back_from_the_message_as_typed(
        name: str) -> None:
    from digest.config import _Bad

    try:
        checked = SUBSCRIBER_KEYS["name"].check(name, Path("."))
    except _Bad as exc:  # the key's refusal: only for encoded words here
        assert "RFC 2047 encoded word" in str(exc), exc
        return
    if checked is None:  # blank: the address's local part stands in
        return
    assert shown_name(checked) == one_line(checked)


@pytest.mark.parametrize(("key", "table", "line"), [
    ("subscribers[0].email", "subscribers", 'email = "=?utf-8?q?support=40bank.example?=@evil.example"'),
    ("smtp.from", "smtp", 'from = "=?utf-8?q?Your_Bank?= <digest@localhost>"'),
    ("smtp.reply_to", "smtp", 'reply_to = "=?utf-8?q?x?= <digest+{token}@localhost>"'),
])
def test_an_address_holding_an_encoded_word_is_refused_naming_the_key(
        tmp_path: Path, key: str, table: str, line: str) -> None:
    """The email package decodes one even in a local part: the header would show another
    address than the envelope's (a spoof), so every configured address refuses it."""
    path = tmp_path / "digest.toml"
    smtp = f'[smtp]\nsink = "outbox"\n{line}\n' if table == "smtp" else '[smtp]\nsink = "outbox"\n'
    subscriber = line if table == "subscribers" else 'email = "mira@lab.example.net"'
    path.write_text(f"{smtp}\n[[subscribers]]\n{subscriber}\n", encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    text = str(caught.value)
    assert key in text and "RFC 2047 encoded word" in text, text
