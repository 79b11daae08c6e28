"""The web page at /ui, driven in Debian's Chromium (Playwright) against the real `bentoml serve` of the session
(tiny CLIP, tiny OWLv2): what the page shows equals what the API answers for the same images and configuration.

One browser for the module, a fresh context (storage, downloads) per test. Screenshots of each state go to
artifacts/ui/ (gitignored). A missing browser fails these tests; it never skips them.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from testing.browser import artifacts_dir, chromium
from testing.client import assert_error, files
from testing.images import jpeg_bytes, png_bytes
from testing.server import Server, serving_files

pytestmark = pytest.mark.server

INVALID_IMAGE = "Invalid image received, unable to open."


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with chromium() as b:
        yield b


@dataclass
class UI:
    page: Any
    server: Server
    console: list[str] = field(default_factory=list)

    def shot(self, name: str, full_page: bool = True) -> None:
        self.page.screenshot(path=str(artifacts_dir() / f"{name}.png"), full_page=full_page)

    def settle(self) -> str:
        """Wait for the debounced run to finish; its outcome: done or error."""
        self.page.wait_for_function(
            "['done', 'error'].includes(document.body.dataset.state)"
            " && document.body.getAttribute('aria-busy') !== 'true'"
        )
        return self.page.evaluate("document.body.dataset.state")

    def fill_class(
        self, i: int, name: str, include: list[str], exclude: list[str] = (), threshold: float | None = None
    ) -> None:
        node = self.page.locator("#classes .class").nth(i)
        node.locator(".name").fill(name)
        node.locator(".include").fill("\n".join(include))
        node.locator(".exclude").fill("\n".join(exclude))
        if threshold is not None:
            set_range(node.locator(".threshold"), threshold)

    def upload(self, *images: tuple[str, bytes, str]) -> None:
        self.page.set_input_files("#file", files=[{"name": n, "mimeType": m, "buffer": b} for n, b, m in images])

    def export(self) -> dict[str, Any]:
        with self.page.expect_download() as d:
            self.page.click("#export")
        return json.loads(open(d.value.path()).read())

    def errors(self) -> list[str]:
        # Chromium reports every non-2xx fetch on the console as "Failed to load resource"; the API's 4xx answers the
        # page shows on purpose are not errors of the page.
        return [m for m in self.console if "Failed to load resource: the server responded with a status of 4" not in m]


def set_range(locator: Any, value: float) -> None:
    locator.evaluate(
        "(el, v) => { el.value = String(v); el.dispatchEvent(new Event('input', {bubbles: true})); }", value
    )


def open_page(browser: Any, server: Server, width: int = 1280, bypass_csp: bool = True) -> UI:
    # Playwright's wait_for_function evaluates its predicate with eval() inside the page, which the page's CSP
    # (api/headers.py) forbids; these tests drive the page's logic, test_the_page_works_under_its_csp its policy.
    ctx = browser.new_context(viewport={"width": width, "height": 900}, accept_downloads=True, bypass_csp=bypass_csp)
    page = ctx.new_page()
    ui = UI(page, server)
    page.on("console", lambda m: ui.console.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: ui.console.append(f"page error: {e}"))
    page.goto(server.url + "/ui/")
    page.wait_for_selector("#classes .class")
    return ui


@pytest.fixture
def ui(browser: Any, server: Server) -> Iterator[UI]:
    ui = open_page(browser, server)
    yield ui
    errors = ui.errors()
    ui.page.context.close()
    assert not errors, errors


def bars(ui: UI) -> list[list[dict[str, Any]]]:
    return ui.page.eval_on_selector_all(
        "#strip .card",
        """cards => cards.map(c => Array.from(c.querySelectorAll('.bar')).map(b => ({
            cls: b.dataset.class, score: Number(b.dataset.score), raw: Number(b.dataset.raw),
            pred: b.classList.contains('pred'), title: b.title})))""",
    )


def boxes(ui: UI, visible_only: bool = False) -> list[dict[str, Any]]:
    return ui.page.eval_on_selector_all(
        "#strip .card .box",
        """(els, visibleOnly) => els.filter(b => !visibleOnly || !b.hidden).map(b => ({
            cls: b.dataset.class, score: Number(b.dataset.score), tlbr: b.dataset.tlbr.split(',').map(Number),
            shown: b.getBoundingClientRect().width > 0}))""",
        visible_only,
    )


def test_the_page_works_under_its_csp(browser: Any, server: Server) -> None:
    """Without bypassing the CSP: the page loads, deploys, shows an uploaded image's bars, and the browser reports
    no violation of the policy (waits by selector: Playwright's function waits need eval)."""
    ui = open_page(browser, server, bypass_csp=False)
    try:
        ui.fill_class(0, "cat", ["cat"])
        ui.upload(("a.jpg", jpeg_bytes(1), "image/jpeg"), ("b.png", png_bytes(2, (80, 60)), "image/png"))
        ui.page.wait_for_selector("body[data-state='done']:not([aria-busy='true']) #strip .card .bar")
        assert ui.page.locator("#strip .card img").count() == 2  # blob: images shown under img-src
        assert ui.page.locator("#strip .card .bar").count() == 2
        assert not ui.errors(), ui.errors()
    finally:
        ui.page.context.close()


def test_classifier_bars_equal_classify(ui: UI, server: Server) -> None:
    ui.fill_class(0, "cat", ["cat", "kitten"], ["cartoon cat"])
    ui.page.click("#add-class")
    ui.fill_class(1, "car", ["car", "truck"])
    images = [("a.jpg", jpeg_bytes(1), "image/jpeg"), ("b.png", png_bytes(2, (80, 60)), "image/png")]
    ui.upload(*images)
    assert ui.settle() == "done"
    shown = bars(ui)
    assert [len(b) for b in shown] == [2, 2]

    body = {
        "classifier_configs": [
            {"name": "cat", "examples_to_include": ["cat", "kitten"], "examples_to_exclude": ["cartoon cat"]},
            {"name": "car", "examples_to_include": ["car", "truck"], "examples_to_exclude": []},
        ],
        "augment_examples": True,
    }
    assert ui.export() == body
    with server.client() as c:
        dep = c.post("/deploy_classifier", json=body).json()["deployed_id"]
        for (_, blob, mime), rows in zip(images, shown):
            want = c.post("/classify", params={"deployed_id": dep}, files=[("data", ("x", blob, mime))]).json()
            assert {r["cls"]: r["score"] for r in rows} == pytest.approx(want["scores"], abs=1e-6)
            assert {r["cls"]: r["raw"] for r in rows} == pytest.approx(want["raw_scores"], abs=1e-6)
            assert [r["cls"] for r in rows if r["pred"]] == [want["pred"]]
            assert [r["score"] for r in rows] == sorted((r["score"] for r in rows), reverse=True)  # ranked
            assert all(r["title"].startswith("raw score ") for r in rows)  # raw scores on hover
    ui.shot("classifier")

    # Phone width: one column, nothing wider than the screen.
    ui.page.set_viewport_size({"width": 390, "height": 844})
    assert ui.page.evaluate("document.documentElement.scrollWidth") <= 390
    ui.shot("classifier-phone")


def test_detector_boxes_equal_detect_and_the_slider_filters(ui: UI, server: Server) -> None:
    ui.page.check("#kind-detector")
    ui.fill_class(0, "cat", ["cat", "kitten"], ["cat toy"], threshold=0.0)
    ui.page.click("#add-class")
    ui.fill_class(1, "dog", ["dog"], threshold=0.0)
    ui.page.uncheck("#agnostic")
    blob = png_bytes(4, (60, 60))
    ui.upload(("street.png", blob, "image/png"))
    assert ui.settle() == "done"
    drawn = boxes(ui)

    body = ui.export()
    assert body == {
        "detector_configs": [
            {
                "name": "cat",
                "examples_to_include": ["cat", "kitten"],
                "examples_to_exclude": ["cat toy"],
                "detection_threshold": 0.0,
            },
            {"name": "dog", "examples_to_include": ["dog"], "examples_to_exclude": [], "detection_threshold": 0.0},
        ],
        "nms_threshold": 0.4,
        "class_agnostic_nms": False,
        "augment_examples": True,
    }
    with server.client() as c:
        dep = c.post("/deploy_detector", json=body).json()["deployed_id"]
        want = c.post("/detect", params={"deployed_id": dep}, files=files(blob)).json()[0]
    assert len(want) >= 2 and len(drawn) == len(want)
    for got, exp in zip(drawn, want):
        assert got["cls"] == exp["class"] and got["score"] == pytest.approx(exp["score"], abs=1e-6)
        assert got["tlbr"] == pytest.approx(exp["tlbr"], abs=1e-3)
        assert got["shown"]
    ui.shot("detector")

    scores = sorted(d["score"] for d in want)
    thr = round((scores[0] + scores[-1]) / 2, 2)
    n_requests = []
    ui.page.on("request", lambda r: n_requests.append(r.url))
    set_range(ui.page.locator("#min-score"), thr)
    visible = boxes(ui, visible_only=True)
    assert 0 < len(visible) < len(want)
    assert len(visible) == sum(d["score"] >= thr for d in want)
    assert all(b["score"] >= thr for b in visible)
    assert not [u for u in n_requests if "/detect" in u or "/deploy" in u]  # filtered in the page, no new request
    ui.shot("detector-slider")


def test_deploy_import_by_id_in_a_fresh_page_and_delete(ui: UI, browser: Any, server: Server) -> None:
    ui.fill_class(0, "red", ["red shape"], ["red square"])
    ui.page.click("#add-class")
    ui.fill_class(1, "other", ["blue shape", "green shape"])
    ui.page.uncheck("#augment")
    ui.page.click("#deploy")
    msg = ui.page.locator("#deploy-message[data-id]")
    msg.wait_for()
    dep = msg.get_attribute("data-id")
    assert ui.page.input_value("#deployed-id") == dep
    assert "New model deployed." in msg.inner_text()
    curl = ui.page.input_value("#curl")
    assert f"/classify?deployed_id={dep}" in curl and curl.startswith("curl ")
    exported = ui.export()
    ui.shot("deployed")

    fresh = open_page(browser, server)
    try:
        fresh.page.fill("#deployed-id", dep)
        fresh.page.click("#import-id")
        fresh.page.locator("#deploy-message", has_text=f"Imported {dep}").wait_for()
        assert fresh.export() == exported
        with server.client() as c:
            stored = c.get("/model_config", params={"deployed_id": dep}).json()
        assert {k: v for k, v in stored.items() if k != "deployed_id"} == exported
        fresh.shot("imported")

        fresh.page.click("#refresh")
        row = fresh.page.locator(f'#deployment-rows tr[data-id="{dep}"]')
        row.wait_for()
        assert "classifier" in row.inner_text()
        fresh.page.on("dialog", lambda d: d.accept())
        row.locator(".delete").click()
        row.wait_for(state="detached")
        fresh.shot("deleted")
        assert not fresh.errors(), fresh.errors()
    finally:
        fresh.page.context.close()
    with server.client() as c:
        assert_error(c.get("/model_config", params={"deployed_id": dep}), 400, "Key not found")


def test_errors_shown_where_they_come_from(ui: UI) -> None:
    ui.fill_class(0, "cat", ["cat"])
    ui.upload(("good.jpg", jpeg_bytes(3), "image/jpeg"), ("corrupt.png", b"this is not an image", "image/png"))
    assert ui.settle() == "error"
    cards = ui.page.locator("#strip .card")
    assert cards.nth(0).locator(".bar").count() == 1
    assert cards.nth(0).locator(".error").is_hidden()
    assert cards.nth(1).locator(".error").inner_text() == INVALID_IMAGE
    ui.shot("corrupt-image")

    ui.page.click("#classes .class .remove")
    assert ui.settle() == "error"
    assert ui.page.inner_text("#config-error") == "Class list is empty."
    ui.shot("empty-class-list")


def test_a_fresh_page_waits_for_a_name_and_shows_the_apis_errors_in_words(ui: UI) -> None:
    """Opened fresh, with an image dropped before anything is typed: no deploy is sent and no error shows, only the
    hint; a class with a name and an example then runs. A validation message of the API (the real server's, for an
    empty class name) reads as a line about the class, the API's message below it."""
    deploys: list[str] = []
    ui.page.on("request", lambda r: deploys.append(r.url) if "/deploy_" in r.url else None)
    assert ui.page.locator("#config-hint").is_visible()
    ui.upload(("a.jpg", jpeg_bytes(2), "image/jpeg"))
    ui.page.wait_for_function("document.body.dataset.state === 'incomplete'")
    assert deploys == [] and ui.page.locator("#config-error").is_hidden()
    assert ui.page.locator("#config-hint").is_visible()
    ui.shot("fresh-page-with-an-image")
    ui.fill_class(0, "cat", ["cat"])
    assert ui.settle() == "done"
    assert len(deploys) == 1 and ui.page.locator("#config-hint").is_hidden()

    with ui.server.client() as c:
        r = c.post("/deploy_classifier", json={"classifier_configs": [{"name": "", "examples_to_include": ["a"]}]})
    assert_error(r, 422, "validation error")
    shown = ui.page.evaluate("m => zss.explain(m)", r.json()["message"])
    assert shown == {"text": "Not deployable yet. Class 1: its name cannot be empty.", "detail": r.json()["message"]}
    plain = ui.page.evaluate("m => zss.explain(m)", "Class list is empty.")
    assert plain == {"text": "Class list is empty.", "detail": ""}  # already in words: shown as it is


def test_api_key_sent_as_bearer_and_401_focuses_the_field(ui: UI) -> None:
    seen: list[str | None] = []
    ui.page.on("request", lambda r: seen.append(r.headers.get("authorization")) if "/deployments" in r.url else None)
    ui.page.fill("#api-key", "s3cret")
    ui.page.dispatch_event("#api-key", "change")
    ui.page.route(
        "**/deployments",
        lambda route: route.fulfill(
            status=401,
            content_type="application/json",
            body=json.dumps({"status_code": 401, "message": "Invalid or missing API key.", "data": None}),
        ),
    )
    ui.page.click("#refresh")
    ui.page.locator("#api-key-error", has_text="Invalid or missing API key.").wait_for()
    assert seen[-1] == "Bearer s3cret"
    assert ui.page.evaluate("document.activeElement.id") == "api-key"
    assert ui.page.evaluate("sessionStorage.getItem('zss.apiKey')") == "s3cret"
    ui.shot("api-key-401")


def test_no_browser_is_an_error_not_a_skip(monkeypatch: pytest.MonkeyPatch) -> None:
    import testing.browser as tb

    monkeypatch.setattr(tb, "CHROMIUM", "/nonexistent/chromium")
    monkeypatch.setattr(tb.shutil, "which", lambda name: None)
    with pytest.raises(tb.NoBrowser, match="apt-get install -y chromium"):
        tb.chromium_path()


def test_images_by_url_drop_and_paste_and_the_debounce(ui: UI, server: Server) -> None:
    blob = jpeg_bytes(7)

    deploys: list[str] = []
    ui.page.on("request", lambda r: deploys.append(r.url) if "/deploy_classifier" in r.url else None)
    ui.page.locator("#classes .class .name").press_sequentially("cat")  # three input events, one debounced deploy
    ui.page.locator("#classes .class .include").fill("cat")
    assert ui.settle() == "done"
    assert len(deploys) == 1, deploys

    with serving_files({"/cat.jpg": (blob, "image/jpeg")}) as port:
        ui.page.fill("#url", f"http://127.0.0.1:{port}/cat.jpg")
        ui.page.click("#url-form button")
        # A dropped file and a pasted one, as the browser hands them to the page.
        for event in ("drop", "paste"):
            ui.page.evaluate(
                """([event, bytes]) => {
                    const dt = new DataTransfer();
                    dt.items.add(new File([new Uint8Array(bytes)], event + '.jpg', {type: 'image/jpeg'}));
                    const e = event === 'drop'
                        ? new DragEvent('drop', {dataTransfer: dt, bubbles: true, cancelable: true})
                        : new ClipboardEvent('paste', {clipboardData: dt, bubbles: true, cancelable: true});
                    (event === 'drop' ? document.querySelector('#drop') : document).dispatchEvent(e);
                }""",
                ["drop", list(blob)] if event == "drop" else ["paste", list(blob)],
            )
        assert ui.settle() == "done"
        shown = bars(ui)
    assert ui.page.locator("#strip .card figcaption").all_inner_texts()[1:] == ["drop.jpg", "paste.jpg"]
    assert len(shown) == 3 and shown[0] == shown[1] == shown[2]  # the same image three ways, the same scores
    ui.shot("url-drop-paste")


def test_import_a_json_file_then_update_the_deployment(ui: UI, server: Server) -> None:
    body = {
        "detector_configs": [
            {"name": "cat", "examples_to_include": ["cat"], "examples_to_exclude": [], "detection_threshold": 0.3}
        ],
        "nms_threshold": 0.5,
        "class_agnostic_nms": True,
        "augment_examples": False,
    }
    with server.client() as c:
        dep = c.post("/deploy_detector", json=body).json()["deployed_id"]
    upload = {**body, "deployed_id": dep}
    file = {"name": "d.json", "mimeType": "application/json", "buffer": json.dumps(upload).encode()}
    ui.page.set_input_files("#import-file", files=[file])
    ui.page.locator("#deploy-message", has_text="Imported d.json").wait_for()
    assert ui.page.is_checked("#kind-detector") and ui.page.input_value("#deployed-id") == dep
    assert ui.export() == body
    ui.page.locator("#classes .class .include").fill("cat\nkitten")
    ui.page.click("#deploy")
    ui.page.locator("#deploy-message", has_text="Model updated.").wait_for()
    with server.client() as c:
        stored = c.get("/model_config", params={"deployed_id": dep}).json()
    assert stored["detector_configs"][0]["examples_to_include"] == ["cat", "kitten"]
    assert "/detect?deployed_id=" + dep in ui.page.input_value("#curl")


def test_every_control_is_labelled(ui: UI) -> None:
    ui.page.click("#add-class")
    unlabelled = ui.page.evaluate(
        """() => Array.from(document.querySelectorAll('input, textarea, select, button')).filter(el =>
            !(el.labels && el.labels.length) && !el.getAttribute('aria-label') && !el.textContent.trim()
        ).map(el => el.outerHTML)"""
    )
    assert unlabelled == []


def test_a_change_cancels_the_request_in_flight(ui: UI) -> None:
    held: list[Any] = []
    failed: list[str] = []

    def hold_the_first(route: Any) -> None:
        if not held:
            held.append(route)  # never answered: the request stays in flight until the page cancels it
        else:
            route.continue_()

    ui.page.route("**/classify?*", hold_the_first)
    ui.page.on("requestfailed", lambda r: failed.append(f"{r.url} {r.failure}") if "/classify" in r.url else None)
    ui.fill_class(0, "cat", ["cat"])
    ui.upload(("a.jpg", jpeg_bytes(5), "image/jpeg"))
    for _ in range(100):
        if held:
            break
        ui.page.wait_for_timeout(100)
    assert held and ui.page.evaluate("document.body.dataset.state") == "busy"
    ui.page.locator("#classes .class .name").fill("kitty")
    assert ui.settle() == "done"
    assert [r["cls"] for r in bars(ui)[0]] == ["kitty"]
    assert len(failed) == 1 and "ERR_ABORTED" in failed[0], failed


def test_image_examples_in_the_form_equal_the_api(ui: UI, server: Server) -> None:
    example, excluded = png_bytes(5, (40, 30)), png_bytes(6, (40, 30))
    ui.fill_class(0, "thing", ["thing"])
    node = ui.page.locator("#classes .class").nth(0)
    node.locator(".include-images").set_input_files(
        files=[{"name": "e.png", "mimeType": "image/png", "buffer": example}]
    )
    node.locator(".exclude-images").set_input_files(
        files=[{"name": "x.png", "mimeType": "image/png", "buffer": excluded}]
    )
    ui.page.click("#add-class")
    ui.fill_class(1, "other", ["other"])
    node.locator(".thumbs li.negative").wait_for()
    images = [("a.png", example, "image/png"), ("b.jpg", jpeg_bytes(7), "image/jpeg")]
    ui.upload(*images)
    assert ui.settle() == "done"
    body = ui.export()
    data_uri = "data:image/png;base64," + base64.b64encode(example).decode()
    assert body["classifier_configs"][0]["examples_to_include"] == ["thing", {"image": data_uri}]
    assert body["classifier_configs"][0]["examples_to_exclude"] == [
        {"image": "data:image/png;base64," + base64.b64encode(excluded).decode()}
    ]
    shown = bars(ui)
    with server.client() as c:
        dep = c.post("/deploy_classifier", json=body).json()["deployed_id"]
        for (_, blob, mime), rows in zip(images, shown):
            want = c.post("/classify", params={"deployed_id": dep}, files=[("data", ("x", blob, mime))]).json()
            assert {r["cls"]: r["raw"] for r in rows} == pytest.approx(want["raw_scores"], abs=1e-6)
    assert shown[0][0]["cls"] == "thing" and shown[0][0]["pred"]  # the example itself: its own class, first
    ui.shot("image-examples")
    # Removing the excluded image takes it out of the configuration.
    node.locator(".thumbs li.negative button").click()
    assert ui.export()["classifier_configs"][0]["examples_to_exclude"] == []


def test_open_set_in_the_form(ui: UI, server: Server) -> None:
    """With an open set whose threshold falls between the images' best raw scores, the page marks as rejected exactly
    the images the API's /classify says are ``rejected`` (for the deployment the page made)."""
    ui.fill_class(0, "cat", ["cat"])
    ui.page.click("#add-class")
    ui.fill_class(1, "car", ["car"])
    blobs = [jpeg_bytes(seed) for seed in range(3, 9)]
    ui.upload(*[(f"{i}.jpg", b, "image/jpeg") for i, b in enumerate(blobs)])
    assert ui.settle() == "done"
    assert ui.page.locator("#strip .rejected-note").count() == 0
    best = [max(b["raw"] for b in card) for card in bars(ui)]
    # A threshold on the slider's 0.01 grid between the lowest and the highest best score, when they differ enough.
    grid = [g / 100 for g in range(101) if min(best) < g / 100 <= max(best)]
    threshold = grid[len(grid) // 2] if grid else 1.0
    ui.page.check("#open-set")
    set_range(ui.page.locator("#open-threshold"), threshold)
    ui.page.fill("#open-label", "something else")
    assert ui.settle() == "done"
    assert ui.export()["open_set"] == {"label": "something else", "threshold": threshold}
    draft = ui.page.evaluate("document.body.dataset.draft")
    with server.client() as c:
        api = [c.post("/classify", params={"deployed_id": draft}, files=files(b)).json()["rejected"] for b in blobs]
    cards = ui.page.locator("#strip .card")
    page = [cards.nth(i).locator(".rejected-note").count() == 1 for i in range(len(blobs))]
    assert page == api, (page, api, best, threshold)
    assert api == [x < threshold for x in best]  # the rule: rejected when the best raw score is below the threshold
    if grid:
        assert any(api) and not all(api), (best, threshold)  # both kinds shown
    for i in (i for i, r in enumerate(api) if r):
        assert cards.nth(i).locator(".rejected-note").get_attribute("data-rejected") == "something else"
    assert [len(b) for b in bars(ui)] == [2] * len(blobs)  # the classes' bars stay
    ui.shot("open-set")
    ui.page.uncheck("#open-set")
    assert ui.settle() == "done"
    assert "open_set" not in ui.export() and ui.page.locator("#strip .rejected-note").count() == 0


def test_collections_panel_search_and_classify_equal_the_api(ui: UI, server: Server) -> None:
    """The Collections panel: pick a collection, search by text and by a dropped image, see the matches as
    thumbnails (fetched with the page's key); classify the collection with the form's classifier and browse its
    classes. What it shows is what the API answers."""
    blobs = [png_bytes(900 + i, (64, 48)) for i in range(5)]
    with server.client() as c:
        c.delete("/collections/ui-photos")
        assert c.post("/collections", json={"name": "ui-photos"}).status_code == 201
        meta = json.dumps([{"i": i} for i in range(5)])
        ids = c.post("/collections/ui-photos/images", files=files(*blobs), data={"metadata": meta}).json()["ids"]
    page = ui.page
    page.click("#collections-refresh")
    page.wait_for_selector("#collection option[value='ui-photos']", state="attached")
    page.select_option("#collection", "ui-photos")
    page.fill("#search-text", "a photo")
    page.fill("#search-k", "3")
    page.click("#search-form button[type=submit]")
    page.wait_for_function("document.querySelectorAll('#matches .match img[src^=\"blob:\"]').length === 3")
    shown = page.eval_on_selector_all("#matches .match", "ms => ms.map(m => [m.dataset.id, Number(m.dataset.score)])")
    sizes = page.eval_on_selector_all("#matches .match img", "ims => ims.map(i => [i.naturalWidth, i.naturalHeight])")
    assert sizes == [[64, 48]] * 3  # thumbnails of the stored images (smaller than the thumbnail size: as they are)
    with server.client() as c:
        want = c.post("/collections/ui-photos/search", json={"text": "a photo", "k": 3}).json()["results"]
    assert [i for i, _ in shown] == [h["id"] for h in want]
    assert [s for _, s in shown] == pytest.approx([h["score"] for h in want], abs=1e-6)

    page.set_input_files("#search-file", files=[{"name": "q.png", "mimeType": "image/png", "buffer": blobs[2]}])
    page.wait_for_selector(f"#matches .match:first-child[data-id='{ids[2]}']")

    ui.fill_class(0, "cat", ["cat"])
    page.click("#add-class")
    ui.fill_class(1, "car", ["car"])
    assert ui.settle() == "done"
    page.click("#classify-collection")
    page.wait_for_function("document.body.dataset.classified && document.querySelectorAll('#class-tabs button').length")
    draft = page.evaluate("document.body.dataset.classified")
    tabs = page.eval_on_selector_all(
        "#class-tabs button", "bs => bs.map(b => [b.dataset.class, Number(b.dataset.count)])"
    )
    with server.client() as c:
        out = c.post("/collections/ui-photos/classify", json={"deployed_id": draft, "limit": 0, "top": 24}).json()
    assert dict(tabs) == out["counts"] and sum(out["counts"].values()) == 5
    for cls, n in tabs:
        if not n:
            continue
        page.click(f"#class-tabs button[data-class='{cls}']")
        page.wait_for_selector(f"#class-tabs button[data-class='{cls}'][aria-pressed='true']")
        want_ids = [r["id"] for r in out["top"][cls]]
        page.wait_for_function(
            "n => document.querySelectorAll('#class-items .match img[src^=\"blob:\"]').length === n", arg=n
        )
        assert page.eval_on_selector_all("#class-items .match", "ms => ms.map(m => m.dataset.id)") == want_ids
    ui.shot("collections")
    page.set_viewport_size({"width": 390, "height": 844})  # phone width: nothing wider than the screen
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    with server.client() as c:
        assert c.delete("/collections/ui-photos").status_code == 200
