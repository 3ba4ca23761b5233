"""Sphinx configuration of the jbyz documentation (``sphinx-build -W docs docs/_build``)."""

import importlib.metadata

project = "jbyz"
author = "jbyz authors"
copyright = "jbyz authors, Apache-2.0"
try:
    release = importlib.metadata.version("jbyz")
except importlib.metadata.PackageNotFoundError:  # not installed: read the source tree
    release = "dev"
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",  # the docstrings are Google style (Args:, Returns:, Attributes:)
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "myst_parser",  # pages (and the experiments' READMEs) are Markdown
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
exclude_patterns = ["_build", "README.md"]
myst_enable_extensions = ["dollarmath"]
myst_heading_anchors = 3

autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_typehints_description_target = "documented"  # types of the documented arguments
autodoc_default_options = {"members": True}
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_ivar = False

html_theme = "furo"
html_title = f"jbyz {release}"


def _skip_namedtuple_fields(app, what, name, obj, skip, options):
    """NamedTuple fields are documented by their class's ``Attributes:`` section; autodoc would
    list them a second time with the generated "Alias for field number N" docstrings."""
    doc = getattr(obj, "__doc__", None) or ""
    if isinstance(doc, str) and doc.startswith("Alias for field number"):
        return True
    return skip


# ``.. jbyz-registry:: jbyz.aggregators AGGREGATORS``: the registry's entries as a table (the
# same name, description and reference that ``jbyz list`` prints), read at build time.
from docutils import nodes  # noqa: E402
from docutils.parsers.rst import Directive  # noqa: E402


class RegistryTable(Directive):
    required_arguments = 2  # module, registry attribute

    def run(self):
        import importlib

        registry = getattr(importlib.import_module(self.arguments[0]), self.arguments[1])
        table = nodes.table()
        group = nodes.tgroup(cols=3)
        table += group
        for width in (20, 50, 40):
            group += nodes.colspec(colwidth=width)

        def row(cells, header=False):
            r = nodes.row()
            for i, text in enumerate(cells):
                para = nodes.paragraph()
                para += nodes.literal(text=text) if (i == 0 and not header) else nodes.Text(text)
                r += nodes.entry("", para)
            return r

        head = nodes.thead()
        head += row(["name", "description", "reference"], header=True)
        body = nodes.tbody()
        for name, description, reference in registry.describe():
            body += row([name, description, reference])
        group += head
        group += body
        return [table]


def setup(app):
    app.connect("autodoc-skip-member", _skip_namedtuple_fields)
    app.add_directive("jbyz-registry", RegistryTable)
