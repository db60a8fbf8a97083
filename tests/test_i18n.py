"""Every message exists in both languages (SPEC O2); every page compiles."""

from idp.factors import FACTORS
from idp.web.i18n import CATALOGS
from idp.web.pages import compile_templates, env


def test_catalogs_have_the_same_keys():
    assert CATALOGS["zh-TW"].keys() == CATALOGS["en"].keys()
    assert all(CATALOGS["zh-TW"].values()) and all(CATALOGS["en"].values())


def test_every_template_compiles():
    """``idp serve`` compiles them all at start: a template with an error stops the server
    there, not on the first user who reaches a rarely shown page."""
    compile_templates()
    assert len(env.cache) == len(env.list_templates())


def test_every_audited_event_and_method_has_a_name_in_both_languages():
    """The activity log shows ``event.<name>`` and ``method.<name>`` (SPEC M6): one without its
    message would show its raw key. Every literal name the provider records is checked."""
    import ast
    import pathlib

    missing = set()
    for path in pathlib.Path("idp").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.Call):
                continue
            name, args = getattr(node.func, "attr", getattr(node.func, "id", None)), node.args
            if name == "record" and args:  # audit.record("event", ...)
                event = args[0]
            elif name == "call" and len(args) > 1 and getattr(args[0], "attr", None) == "record":
                event = args[1]  # db.call(audit.record, "event", ...)
            elif name == "_audit" and len(args) > 2:
                event = args[2]
            else:
                continue
            names = [("event.", event)] + [("method.", k.value) for k in node.keywords if k.arg == "method"]
            while names:  # a literal, or either side of ``a if ... else b``
                prefix, name = names.pop()
                if isinstance(name, ast.IfExp):
                    names += [(prefix, name.body), (prefix, name.orelse)]
                elif isinstance(name, ast.Constant) and name.value:
                    missing |= {(locale, prefix + name.value) for locale in CATALOGS if prefix + name.value not in CATALOGS[locale]}
    # A login's method is its factors' names, joined by "+".
    missing |= {(locale, "method." + name) for name in FACTORS for locale in CATALOGS if "method." + name not in CATALOGS[locale]}
    assert sorted(missing) == []
