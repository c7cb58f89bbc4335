"""The pages' templates beside Flower's, and their links in Flower's navigation bar.

Flower renders every page from its own template directory through one Tornado template
loader. This loader serves our templates (``templates/mipos-*.html``) by name, Flower's
others from Flower's directory (so ``{% extends "base.html" %}`` is Flower's page, with
its Bootstrap look), and Flower's ``navbar.html`` with two more links: Orders and Dead
letters. Should a later Flower change its navigation bar so that the place is not found,
its pages show without our links, and ours still link back to Flower's (their own bar).
"""

from __future__ import annotations

from pathlib import Path

import tornado.template

PAGES_TEMPLATES = Path(__file__).resolve().parent / "templates"
OWN_PREFIX = "mipos-"
NAV_END = b"</ul>"  # the end of the first list of Flower's bar: Workers, Tasks, Broker
NAV_LINKS = b"""
        <li class="nav-item">
          <a class="nav-link{% if active_tab == 'mipos-orders' %} active{% end %}"
            href="{{ reverse_url('mipos-orders') }}"
            {% if active_tab == 'mipos-orders' %}aria-current="page"{% end %}>Orders</a>
        </li>
        <li class="nav-item">
          <a class="nav-link{% if active_tab == 'mipos-dead-letters' %} active{% end %}"
            href="{{ reverse_url('mipos-dead-letters') }}"
            {% if active_tab == 'mipos-dead-letters' %}aria-current="page"{% end %}>Dead letters</a>
        </li>
      """


def with_our_links(navbar: bytes) -> bytes:
    """Flower's navbar.html with our links at the end of its first list (unchanged if it has none)."""
    at = navbar.find(NAV_END)
    return navbar if at < 0 else navbar[:at] + NAV_LINKS + navbar[at:]


class PagesLoader(tornado.template.Loader):
    """Flower's templates, ours beside them, and Flower's navigation bar with our links."""

    def __init__(self, flower_templates: str, **kwargs: object) -> None:
        super().__init__(flower_templates, **kwargs)  # type: ignore[arg-type]

    def _create_template(self, name: str) -> tornado.template.Template:
        own = PAGES_TEMPLATES / name
        if name.startswith(OWN_PREFIX) and own.is_file():
            source = own.read_bytes()
        else:
            source = Path(self.root, name).read_bytes()
            if name == "navbar.html":
                source = with_our_links(source)
        return tornado.template.Template(source, name=name, loader=self)
