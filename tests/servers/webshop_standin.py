"""TEST STAND-IN for the WebShop site server — not WebShop itself.

The real site (princeton-nlp/WebShop `web_agent_site`) cannot run here: PyPI `webshop`
0.1.0 ships only `app.py`/`utils.py`, which import `web_agent_site.engine` (product loading,
the pyserini/Lucene search index, the page templates, the reward), and that package is on
no registry. This server follows the same HTTP protocol and page structure on a tiny
catalogue the test writes, so the adapter (`stepflow.envs.webshop`) is exercised over real
HTTP: sessions `fixed_<goal>`, `/search_results/...`, `/item_page/...`,
`/item_sub_page/...`, `/done/...` with "Your score (min 0.0, max 1.0)". Search ranks by
keyword overlap; the reward is a simplified WebShop reward: the share of the goal's
attributes the product has, options chosen as asked and price under the limit, times 0
for a product of another category.

    python tests/servers/webshop_standin.py catalogue.json --port 3000
"""

from __future__ import annotations

import argparse
import ast
import html
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote

PER_PAGE = 10


def _page(instruction: str, body: str) -> str:
    return (
        "<html><head><title>WebShop</title></head><body>"
        f'<div id="instruction-text"><h4>Instruction:<br>{html.escape(instruction)}</h4></div>'
        f"{body}</body></html>"
    )


def _button(label: str) -> str:
    return f'<form method="post"><button type="submit">{html.escape(label)}</button></form>'


class Shop:
    """The catalogue, the goals and the pages."""

    def __init__(self, catalogue: dict) -> None:
        self.products = {p["asin"]: p for p in catalogue["products"]}
        self.goals = catalogue["goals"]

    def goal(self, session: str) -> dict:
        return self.goals[int(session.rsplit("_", 1)[-1])]

    def search(self, keywords: str) -> list[dict]:
        words = set(keywords.lower().split())
        scored = []
        for product in self.products.values():
            text = f"{product['name']} {product['category']}".lower().split()
            score = len(words & set(text))
            if score:
                scored.append((-score, product["asin"], product))
        return [product for *_, product in sorted(scored)]

    def reward(self, goal: dict, asin: str, options: dict) -> float:
        product = self.products[asin]
        if product["category"] != goal["category"]:
            return 0.0
        attrs = goal.get("attributes", [])
        wanted = goal.get("options", {})
        hits = sum(a in product.get("attributes", []) for a in attrs)
        hits += sum(options.get(k) == v for k, v in wanted.items())
        hits += product["price"] <= goal["price_upper"]
        return round(hits / (len(attrs) + len(wanted) + 1), 4)

    def render(self, parts: list[str]) -> str | None:
        route, session = parts[0], unquote(parts[1]) if len(parts) > 1 else ""
        if len(parts) == 1:
            session, route = unquote(parts[0]), "index"
        goal = self.goal(session)
        text = goal["instruction_text"]
        if route == "index":
            return _page(text, '<input id="search_input" name="search_query">' + _button("Search"))
        if route == "search_results":
            keywords, page = unquote(parts[2]), int(parts[3])
            found = self.search(keywords)
            rows = "".join(
                f'<div><h4><a class="product-link" href="#">{p["asin"]}</a></h4>'
                f"<h4>{html.escape(p['name'])}</h4><h5>${p['price']:.2f}</h5></div>"
                for p in found[(page - 1) * PER_PAGE : page * PER_PAGE]
            )
            more = _button("Next >") if page * PER_PAGE < len(found) else ""
            prev = _button("< Prev") if page > 1 else ""
            head = f"<h5>Page {page} (Total results: {len(found)})</h5>"
            return _page(text, _button("Back to Search") + head + prev + more + rows)
        if route in ("item_page", "item_sub_page"):
            product = self.products[unquote(parts[2])]
            body = _button("Back to Search") + _button("< Prev")
            if route == "item_sub_page":
                subpage = unquote(parts[5])
                detail = {
                    "Description": product.get("description", ""),
                    "Features": "; ".join(product.get("features", [])),
                    "Reviews": "No reviews yet.",
                    "Attributes": ", ".join(product.get("attributes", [])),
                }[subpage]
                return _page(text, body + f"<p>{html.escape(detail)}</p>")
            for group, values in product.get("options", {}).items():
                body += f"<h4>{html.escape(group)}</h4>" + "".join(
                    f'<input type="radio" name="{group}"><label>{html.escape(v)}</label>'
                    for v in values
                )
            body += f"<h2>{html.escape(product['name'])}</h2>"
            body += f"<h4>Price: ${product['price']:.2f}</h4><h4>Rating: N.A.</h4>"
            body += "".join(_button(b) for b in ("Description", "Features", "Reviews"))
            return _page(text, body + _button("Buy Now"))
        if route == "done":
            asin, options = unquote(parts[2]), ast.literal_eval(unquote(parts[3]))
            score = self.reward(goal, asin, options)
            body = "<h1>Thank you for shopping with us!</h1>"
            body += f'<h3>Your score (min 0.0, max 1.0)</h3><h3 id="reward"><pre>{score}</pre></h3>'
            return _page(text, body)
        return None


def make_server(catalogue: dict, port: int = 0) -> ThreadingHTTPServer:
    """A server on 127.0.0.1:`port` (0: a free one); call `serve_forever()` to run it."""
    shop = Shop(catalogue)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            parts = [p for p in self.path.split("?", 1)[0].split("/") if p]
            try:
                page = shop.render(parts) if parts else None
            except (KeyError, IndexError, ValueError, SyntaxError):
                page = None
            status, body = (200, page) if page is not None else (404, "not found")
            data = body.encode()
            self.send_response(status)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args) -> None:
            pass

    return ThreadingHTTPServer(("127.0.0.1", port), Handler)


def start_in_thread(catalogue: dict) -> tuple[ThreadingHTTPServer, str]:
    """Start a server in a daemon thread; returns it and its base URL."""
    server = make_server(catalogue)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("catalogue", help="JSON with 'products' and 'goals'")
    parser.add_argument("--port", type=int, default=3000)
    args = parser.parse_args()
    with open(args.catalogue) as handle:
        make_server(json.load(handle), args.port).serve_forever()
