"""Tests for relay.smtp.address: RFC 5321 paths and ESMTP parameters."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.domains import DomainError
from relay.smtp.address import Path, UnsendableAddress, normalized_path, parse_params, parse_path, split_argument


# -- split_argument ---------------------------------------------------------------


def test_split_path_and_params() -> None:
    """The path is separated from the parameters that follow it."""
    assert split_argument("<a@b.test> SIZE=10 BODY=8BITMIME") == ("<a@b.test>", "SIZE=10 BODY=8BITMIME")


def test_split_tolerates_one_space_after_colon() -> None:
    """``MAIL FROM: <x>`` (one space before the path) is accepted."""
    assert split_argument(" <a@b.test>") == ("<a@b.test>", "")


def test_split_refuses_two_spaces_and_missing_brackets() -> None:
    """More than one space, or a path without angle brackets, is refused."""
    for text in ("  <a@b.test>", "a@b.test", " a@b.test"):
        with pytest.raises(ValueError):
            split_argument(text)


def test_split_quoted_bracket_does_not_end_path() -> None:
    """A ``>`` inside a quoted local part does not close the path."""
    assert split_argument('<"a>b"@x.test> SMTPUTF8') == ('<"a>b"@x.test>', "SMTPUTF8")


def test_split_refuses_garbage_after_path() -> None:
    """Text glued to the closing bracket is refused."""
    with pytest.raises(ValueError):
        split_argument("<a@b.test>SIZE=1")


def test_split_refuses_unclosed_path() -> None:
    """A path without its closing bracket is refused."""
    with pytest.raises(ValueError):
        split_argument("<a@b.test")


# -- parse_path: accepted forms ---------------------------------------------------


def test_plain_mailbox() -> None:
    """``<user@domain>`` gives the mailbox as sent, case kept."""
    assert parse_path("<User@Example.ORG>", False) == Path("User@Example.ORG")


def test_null_path() -> None:
    """``<>`` is the null path, an empty mailbox."""
    path = parse_path("<>", False)
    assert path.mailbox == "" and path.is_null


def test_quoted_local_part() -> None:
    """A quoted local part with a space is accepted and kept quoted."""
    assert parse_path('<"john doe"@x.test>', False).mailbox == '"john doe"@x.test'


def test_quoted_local_part_with_at_and_escape() -> None:
    """A quoted local part may hold ``@`` and escaped quotes."""
    assert parse_path(r'<"a@b\"c"@x.test>', False).mailbox == r'"a@b\"c"@x.test'


def test_ipv4_literal() -> None:
    """``user@[192.0.2.1]`` is accepted."""
    assert parse_path("<user@[192.0.2.1]>", False).mailbox == "user@[192.0.2.1]"


def test_ipv6_literal() -> None:
    """``user@[IPv6:2001:db8::1]`` is accepted."""
    assert parse_path("<user@[IPv6:2001:db8::1]>", False).mailbox == "user@[IPv6:2001:db8::1]"


def test_source_route() -> None:
    """A source-routed path keeps its hops apart from the final mailbox."""
    path = parse_path("<@a.test,@b.test:user@dom.test>", False)
    assert path == Path("user@dom.test", ("a.test", "b.test"))
    assert path.wire() == "<@a.test,@b.test:user@dom.test>"


def test_a_label_domain_without_smtputf8() -> None:
    """A-label domains are plain ASCII and always accepted."""
    assert parse_path("<u@xn--bcher-kva.example>", False).mailbox == "u@xn--bcher-kva.example"


def test_u_label_domain_needs_smtputf8() -> None:
    """A U-label domain is accepted with SMTPUTF8 only."""
    assert parse_path("<u@bücher.example>", True).mailbox == "u@bücher.example"
    with pytest.raises(ValueError):
        parse_path("<u@bücher.example>", False)


def test_utf8_local_part_needs_smtputf8() -> None:
    """A UTF-8 local part is accepted with SMTPUTF8 only."""
    assert parse_path("<jösé@x.test>", True).mailbox == "jösé@x.test"
    with pytest.raises(ValueError):
        parse_path("<jösé@x.test>", False)


# -- parse_path: refused forms ----------------------------------------------------------


@pytest.mark.parametrize("text", [
    "user@x.test",  # no brackets
    "<user@x.test",
    "<user>",  # no domain
    "<@x.test>",  # empty local part
    "<user@>",
    "<user@-x.test>",
    "<user@x-.test>",
    "<user@x..test>",
    "<user@x.test.>",  # trailing dot
    "<user@x_y.test>",
    "<us er@x.test>",
    "<a..b@x.test>",
    "<.a@x.test>",
    "<a@b@x.test>",
    "<user@[192.0.2.256]>",
    "<user@[192.0.2]>",
    "<user@[IPv6:2001:db8::g]>",
    "<user@[IPv6:fe80::1%eth0]>",
    "<user@[tag:content]>",
    "<user@[192.0.2.1>",
    "<@a.test:>",
    "<@a.test>",
    "<@a.test,b.test:u@x.test>",
    "<@a_b.test:u@x.test>",
    '<"unterminated@x.test>',
    '<"a"b@x.test>',
    "<user@x.test\x00>",
    "<us\ter@x.test>",
    "<user@x.test\r\n>",
])
def test_refused_paths(text: str) -> None:
    """Malformed paths are refused with ValueError, with or without SMTPUTF8."""
    with pytest.raises(ValueError):
        parse_path(text, True)


def test_local_part_over_64_octets() -> None:
    """A local part of 65 octets is refused; 64 pass."""
    assert parse_path(f"<{'a' * 64}@x.test>", False)
    with pytest.raises(ValueError, match="64"):
        parse_path(f"<{'a' * 65}@x.test>", False)


def test_local_part_limit_counts_octets() -> None:
    """The 64 octet limit counts UTF-8 octets, not characters."""
    with pytest.raises(ValueError):
        parse_path(f"<{'é' * 33}@x.test>", True)


def test_path_over_256_octets() -> None:
    """A path of 257 octets is refused; 256 pass."""
    domain = ".".join(["a" * 60] * 4)
    text = f"<{'u' * 10}@{domain}>"
    assert len(text) == 256
    assert parse_path(text, False)
    with pytest.raises(ValueError, match="256"):
        parse_path(f"<{'u' * 11}@{domain}>", False)


def test_label_over_63_octets() -> None:
    """A domain label of 64 octets is refused."""
    with pytest.raises(ValueError):
        parse_path(f"<u@{'a' * 64}.test>", False)


# -- parse_params ----------------------------------------------------------------------


def test_params_keywords_upper_cased() -> None:
    """Keywords are upper-cased; values are kept as sent; a bare keyword has None."""
    assert parse_params("size=100 body=8bitmime SMTPUTF8") == [
        ("SIZE", "100"), ("BODY", "8bitmime"), ("SMTPUTF8", None)]


def test_params_xtext_kept() -> None:
    """xtext values are not decoded."""
    assert parse_params("ENVID=a+2Bb") == [("ENVID", "a+2Bb")]


def test_params_empty() -> None:
    """No parameters gives an empty list."""
    assert parse_params("") == []


@pytest.mark.parametrize("text", ["SIZE=", "=1", "-X=1", "SI_ZE=1", "SIZE=1 size=2", "X=a=b", "X=\x01"])
def test_params_refused(text: str) -> None:
    """Malformed or repeated parameters are refused."""
    with pytest.raises(ValueError):
        parse_params(text)


# -- properties -------------------------------------------------------------------------


@settings(max_examples=400, deadline=None)
@given(st.text(max_size=80), st.booleans())
def test_parse_path_only_raises_value_error(text: str, smtputf8: bool) -> None:
    """On arbitrary text the path parser answers a Path or raises ValueError, nothing else."""
    try:
        parse_path(text, smtputf8)
        parse_path("<" + text + ">", smtputf8)
        split_argument(text)
    except ValueError:
        pass


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet="<>@\"\\.:,[]aZ0 -é", max_size=40), st.booleans())
def test_parse_path_punctuation_only_raises_value_error(text: str, smtputf8: bool) -> None:
    """Texts dense in path punctuation never raise anything but ValueError."""
    try:
        parse_path(text, smtputf8)
    except ValueError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=60))
def test_parse_params_only_raises_value_error(text: str) -> None:
    """On arbitrary text the parameter parser answers a list or raises ValueError."""
    try:
        result = parse_params(text)
    except ValueError:
        return
    assert all(k == k.upper() for k, _ in result)


_ATEXT = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!#$%&'*+-/=?^_`{|}~"
_atom = st.text(alphabet=_ATEXT, min_size=1, max_size=10)
_dot_string = st.lists(_atom, min_size=1, max_size=3).map(".".join)
_qtext = st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126, blacklist_characters="<>"), max_size=10)
_quoted = _qtext.map(lambda s: '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"')
_ALNUM = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
_label = st.one_of(
    st.text(alphabet=_ALNUM, min_size=1, max_size=12),
    st.tuples(st.sampled_from(_ALNUM), st.text(alphabet=_ALNUM + "-", max_size=10),
              st.sampled_from(_ALNUM)).map("".join),
)
_domain = st.lists(_label, min_size=1, max_size=4).map(".".join)
_ipv4 = st.ip_addresses(v=4).map(lambda a: f"[{a}]")
_ipv6 = st.ip_addresses(v=6).map(lambda a: f"[IPv6:{a}]")
_mailbox = st.tuples(st.one_of(_dot_string, _quoted), st.one_of(_domain, _ipv4, _ipv6)).filter(
    lambda t: len(t[0]) <= 64).map("@".join)


@settings(max_examples=200, deadline=None)
@given(_mailbox, st.lists(_domain, max_size=3))
def test_valid_paths_round_trip(mailbox: str, route: list[str]) -> None:
    """A generated valid path parses, keeps its mailbox and route, and formats back to itself."""
    path = Path(mailbox, tuple(route))
    parsed = parse_path(path.wire(), smtputf8=False)
    assert parsed == path
    assert parse_path(parsed.wire(), smtputf8=False) == parsed


# -- IDNA 2008, Unicode controls, what the client can send ------------------------------


@pytest.mark.parametrize("char", ["\u2028", "\u2029", "\u0085", "\u009b", "\u202e", "\ufeff", "\u3000", "\ue000"])
def test_unicode_separators_and_controls_refused(char: str) -> None:
    """Line/paragraph separators, C1 controls, bidi overrides, odd spaces and private use are refused in addresses."""
    with pytest.raises(ValueError, match="not allowed|control"):
        parse_path(f"<jo{char}se@x.test>", True)
    with pytest.raises(ValueError):
        parse_path(f"<jose@x{char}.test>", True)


def test_del_refused() -> None:
    """DEL is refused in an address."""
    with pytest.raises(ValueError, match="control"):
        parse_path("<jo\x7fse@x.test>", False)


@pytest.mark.parametrize("local", ['"x>; <y"', '"a<b"', '"a>b"'])
def test_unsendable_quoted_local_part_refused(local: str) -> None:
    """A quoted local part holding '<' or '>' (which the client refuses to send) is refused as UnsendableAddress."""
    with pytest.raises(UnsendableAddress):
        parse_path(f"<{local}@partner.test>", False)


@pytest.mark.parametrize("domain", ["😀.example", "xn--ls8h.example", "☃.example", "xn--zz.example", "a\u200db.example"])
def test_domains_invalid_under_idna_2008_refused(domain: str) -> None:
    """Emoji and symbols (valid in IDNA 2003), bad A-labels and a bare joiner are refused as DomainError."""
    with pytest.raises(DomainError):
        parse_path(f"<user@{domain}>", True)


@pytest.mark.parametrize("domain, normal", [
    ("faß.de", "faß.de"),
    ("FAß.De", "faß.de"),
    ("ς.example", "ς.example"),
    ("Bücher.Example", "bücher.example"),
    ("ｐａｒｔｎｅｒ.test", "partner.test"),
    ("ｘ。test", "x.test"),
    ("ＢＵＣＨ.example", "buch.example"),
])
def test_u_label_domains_normalised(domain: str, normal: str) -> None:
    """U-labels (mixed case, ß, final sigma, fullwidth letters and full stops) are accepted and normalised by UTS #46, nontransitional."""
    path = parse_path(f"<Üser@{domain}>", True)
    assert normalized_path(path).mailbox == f"Üser@{normal}"


def test_normalised_path_keeps_ascii_and_normalises_hops() -> None:
    """ASCII mailboxes are kept as sent; U-label hops of a source route are normalised too."""
    path = parse_path("<@ＧＷ.test,@b.test:User@Example.TEST>", True)
    assert normalized_path(path) == Path("User@Example.TEST", ("gw.test", "b.test"))


def test_fullwidth_domain_needs_smtputf8() -> None:
    """A fullwidth spelling of an ASCII domain is non-ASCII text: refused without SMTPUTF8."""
    with pytest.raises(ValueError, match="SMTPUTF8"):
        parse_path("<user@ｐａｒｔｎｅｒ.test>", False)


# -- the fast paths give the character-by-character answers ------------------------


def _outcome(function, *args):
    """What ``function(*args)`` returned, or the text of the ValueError it raised."""
    try:
        return ("ok", function(*args))
    except ValueError as e:
        return ("error", str(e))


_PATH_TEXT = st.text(alphabet=st.sampled_from('<>"\\@a.b- \x00\x7féx'), max_size=30)


@settings(max_examples=400, deadline=None)
@given(text=_PATH_TEXT, smtputf8=st.booleans())
def test_address_scans_agree_with_the_character_by_character_rules(text: str, smtputf8: bool) -> None:
    """The closing bracket, the character check and the label check answer as a scan of every character does."""
    from relay.smtp.address import (_LDH, _check_characters, _check_each_character, _check_label, _closing_bracket,
                                    _closing_bracket_scanned)

    assert _outcome(_closing_bracket, "<" + text) == _outcome(_closing_bracket_scanned, "<" + text)
    assert _outcome(_check_characters, text, smtputf8) == _outcome(_check_each_character, text, smtputf8)
    label = text.replace(".", "")
    if label and len(label) <= 63:
        by_char = all(c in _LDH for c in label) and label[0] != "-" and label[-1] != "-"
        assert (_outcome(_check_label, label)[0] == "ok") == by_char

