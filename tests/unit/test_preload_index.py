"""The name index of stores.preload: until complete every name may exist; once complete, only
the loaded names and those a notification mentioned since."""

from __future__ import annotations

from proxy.stores.preload import NameIndex


def test_until_complete_every_name_may_exist() -> None:
    index = NameIndex()
    assert index.may_have_slug("any") and index.may_have_domain("a.test")
    assert index.may_have_prefix("fr_live_abcd")


def test_complete_knows_only_its_names_and_those_mentioned() -> None:
    index = NameIndex()
    index.slugs.add("acme")
    index.prefixes.add("fr_live_abcd")
    index.complete = True
    assert index.may_have_slug("acme") and not index.may_have_slug("other")
    assert not index.may_have_domain("videos.acme.test")
    assert index.may_have_prefix("fr_live_abcd") and not index.may_have_prefix("fr_live_zzzz")
    index.mention(["other"], ["videos.acme.test"], ["fr_live_zzzz"])
    assert index.may_have_slug("other") and index.may_have_domain("videos.acme.test")
    assert index.may_have_prefix("fr_live_zzzz")


def test_reset_forgets_everything_until_the_next_preload() -> None:
    index = NameIndex()
    index.slugs.add("acme")
    index.complete = True
    index.reset()
    assert index.may_have_slug("gone") and not index.slugs
