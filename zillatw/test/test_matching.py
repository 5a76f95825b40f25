"""zillatw.matching: Zilla's route wildcards. Only `*` is special (plus `{name}` for http
headers), the whole value must match, regex metacharacters are literal, `query_tail` lets
an http :path pattern ignore a query, and a configured field never matches a missing value."""

from __future__ import annotations

from twisted.trial import unittest

from zillatw.matching import matcher, wildcard


class WildcardTests(unittest.SynchronousTestCase):
    def test_star_matches_anything_including_nothing(self):
        pattern = wildcard("/echo*")
        for value in ("/echo", "/echo/", "/echo/a/b?c=d", "/echoes"):
            self.assertIsNotNone(pattern.fullmatch(value), value)
        self.assertIsNone(pattern.fullmatch("/ech"))

    def test_star_alone_matches_every_string(self):
        for value in ("", "x", "a b\tc", "line\nbreak"):
            self.assertIsNotNone(wildcard("*").fullmatch(value), repr(value))

    def test_star_in_the_middle_and_several_stars(self):
        self.assertIsNotNone(wildcard("v*.echo").fullmatch("v2.echo"))
        self.assertIsNotNone(wildcard("v*.echo").fullmatch("v.echo"))
        self.assertIsNone(wildcard("v*.echo").fullmatch("v2.echo.x"))
        self.assertIsNotNone(wildcard("*:*").fullmatch("localhost:7114"))
        self.assertIsNone(wildcard("*:*").fullmatch("localhost"))

    def test_whole_value_must_match(self):
        pattern = wildcard("echo")
        self.assertIsNotNone(pattern.fullmatch("echo"))
        self.assertIsNone(pattern.fullmatch("echo2"))
        self.assertIsNone(pattern.fullmatch("my-echo"))

    def test_regex_metacharacters_are_literal(self):
        for pattern, same, other in (("/a+b", "/a+b", "/aab"),
                                     ("a.c", "a.c", "abc"),
                                     ("(x)", "(x)", "x"),
                                     ("[ab]", "[ab]", "a"),
                                     ("a?", "a?", "a"),
                                     ("^a$", "^a$", "a"),
                                     ("a|b", "a|b", "b"),
                                     ("a\\d", "a\\d", "a1"),
                                     ("x{2}", "x{2}", "xx")):
            self.assertIsNotNone(wildcard(pattern).fullmatch(same), pattern)
            self.assertIsNone(wildcard(pattern).fullmatch(other), pattern)

    def test_metacharacters_next_to_a_star(self):
        pattern = wildcard("/v1.*+")
        self.assertIsNotNone(pattern.fullmatch("/v1.anything+"))
        self.assertIsNone(pattern.fullmatch("/v1xanything+"))
        self.assertIsNone(pattern.fullmatch("/v1.anything"))

    def test_braces_are_literal_without_named_groups(self):
        self.assertIsNotNone(wildcard("/{id}").fullmatch("/{id}"))
        self.assertIsNone(wildcard("/{id}").fullmatch("/42"))

    def test_named_groups_capture_a_non_empty_value(self):
        pattern = wildcard("/items/{id}/detail", named_groups=True)
        match = pattern.fullmatch("/items/42/detail")
        self.assertEqual(match.groupdict(), {"id": "42"})
        self.assertIsNone(pattern.fullmatch("/items//detail"))

    def test_several_named_groups(self):
        match = wildcard("{host}:{port}", named_groups=True).fullmatch("example.com:7114")
        self.assertEqual(match.groupdict(), {"host": "example.com", "port": "7114"})

    def test_repeated_name_compiles_and_captures_once(self):
        pattern = wildcard("/{id}/{id}", named_groups=True)
        self.assertEqual(pattern.fullmatch("/a/b").groupdict(), {"id": "a"})
        self.assertIsNone(pattern.fullmatch("/a"))

    def test_brace_text_that_is_not_a_name_stays_literal(self):
        for text in ("{1x}", "{}", "{a-b}", "{ a }"):
            pattern = wildcard(f"/{text}", named_groups=True)
            self.assertIsNotNone(pattern.fullmatch(f"/{text}"), text)
            self.assertIsNone(pattern.fullmatch("/value"), text)

    def test_query_tail_lets_a_path_carry_a_query(self):
        pattern = wildcard("/echo", query_tail=True)
        for value in ("/echo", "/echo?", "/echo?x=1", "/echo?x=1&y=/z"):
            self.assertIsNotNone(pattern.fullmatch(value), value)
        for value in ("/echo/", "/echoes", "/echo#x", "/ech?o"):
            self.assertIsNone(pattern.fullmatch(value), value)

    def test_query_tail_not_added_after_a_final_star(self):
        self.assertEqual(wildcard("/echo*", query_tail=True).pattern, wildcard("/echo*").pattern)

    def test_query_tail_with_a_named_group(self):
        pattern = wildcard("/items/{id}", named_groups=True, query_tail=True)
        self.assertEqual(pattern.fullmatch("/items/7?full=1").group("id"), "7")


class MatcherTests(unittest.SynchronousTestCase):
    def test_unconfigured_field_matches_anything_even_missing(self):
        match = matcher(None)
        for value in (None, "", "echo"):
            self.assertTrue(match(value), repr(value))

    def test_configured_field_never_matches_a_missing_value(self):
        for pattern, flags in (("echo", {}), ("*", {}), ("", {}), ("{id}", {"named_groups": True}),
                               ("/echo", {"query_tail": True}), ("/*", {"named_groups": True, "query_tail": True})):
            self.assertFalse(matcher(pattern, **flags)(None), (pattern, flags))

    def test_star_matches_an_empty_value(self):
        self.assertTrue(matcher("*")(""))

    def test_literal_pattern_is_exact_and_case_sensitive(self):
        match = matcher("echo")
        self.assertTrue(match("echo"))
        self.assertFalse(match("Echo"))
        self.assertFalse(match("echo "))
        self.assertFalse(match(""))

    def test_empty_pattern_matches_only_an_empty_value(self):
        self.assertTrue(matcher("")(""))
        self.assertFalse(matcher("")("x"))

    def test_wildcard_pattern(self):
        match = matcher("v*.chat")
        self.assertTrue(match("v1.chat"))
        self.assertFalse(match("v1.chat2"))

    def test_literal_pattern_with_metacharacters(self):
        self.assertTrue(matcher("a.b")("a.b"))
        self.assertFalse(matcher("a.b")("axb"))
        self.assertTrue(matcher("a.b*")("a.bc"))
        self.assertFalse(matcher("a.b*")("axbc"))

    def test_path_matcher_with_query_tail(self):
        match = matcher("/echo", named_groups=True, query_tail=True)
        self.assertTrue(match("/echo"))
        self.assertTrue(match("/echo?token=x"))
        self.assertFalse(match("/echo/x"))

    def test_named_group_matcher(self):
        match = matcher("/items/{id}", named_groups=True)
        self.assertTrue(match("/items/1"))
        self.assertFalse(match("/items/"))
        self.assertTrue(match("/items/1/2"))  # a name matches across '/'

    def test_braces_literal_in_a_matcher_without_named_groups(self):
        self.assertTrue(matcher("{id}")("{id}"))
        self.assertFalse(matcher("{id}")("42"))
