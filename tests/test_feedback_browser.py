"""A labeler in real headless Chromium: instructions, keyboard and button ranking, a tie, a skip;
the export holds exactly those rankings; model output with <script>/<img onerror> stays text.

Screenshots of the instructions, ranking and admin pages go to $RLHF_ARTIFACTS (default
artifacts/ in the repository)."""

import json
from pathlib import Path

import pytest

from conftest import CHROMIUM, artifacts

from rlhf.feedback.campaign import import_campaign
from rlhf.feedback.export import label_records
from rlhf.feedback.server import admin_link, labeler_link, start_in_thread
from rlhf.feedback.store import open_store

pytestmark = [pytest.mark.browser,
              pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"{CHROMIUM} missing: apt-get install -y chromium")]
XSS_SCRIPT = '<script>window.__pwned = 1; alert("script ran")</script> Sure, here is my answer.'
XSS_IMG = '<img src=x onerror="window.__pwned = 2; alert(\'img ran\')"> A picture says it all.'
ITEMS = [
    {"prompt_id": "xss", "prompt": "Tell me about <b>HTML</b> & safety",
     "completions": [XSS_SCRIPT, XSS_IMG, "HTML is a markup language; treat untrusted text as text."]},
    {"prompt_id": "rice", "prompt": "How do I cook rice?",
     "completions": ["Rinse the rice, add twice the water, simmer for 18 minutes, then rest it covered.",
                     "Boil it.", "Rice is a grain.", "Use a rice cooker and follow the marks on the bowl."]},
    {"prompt_id": "skipme", "prompt": "asdf qwer zxcv", "completions": ["???", "!!!"]},
]
GOLD = {"prompt_id": "gold", "prompt": "Say hello politely.", "ranking": [0, 1, 2],
        "completions": ["Hello! How can I help you today?", "hi", "Go away."]}
INSTRUCTIONS = """# Rank by helpfulness

Read the prompt, then every completion. The most **helpful** reply goes to the top.

- A reply that answers the question beats one that does not.
- Mark a tie only when you truly cannot choose.
- Skip an item you cannot judge, and say why.
"""


@pytest.fixture()
def server(tmp_path):
    store = open_store(tmp_path / "labels.sqlite")
    comp = tmp_path / "c.jsonl"
    comp.write_text("".join(json.dumps(r) + "\n" for r in ITEMS), encoding="utf-8")
    gold = tmp_path / "gold.jsonl"
    gold.write_text(json.dumps(GOLD) + "\n", encoding="utf-8")
    (tmp_path / "instructions.md").write_text(INSTRUCTIONS, encoding="utf-8")
    camp = import_campaign(store, comp, "helpfulness", 3, tmp_path / "instructions.md", gold, name="demo-helpfulness")
    _, admin = store.add_user("admin", "admin", None)
    _, ann = store.add_user("ann", "labeler", camp.id)
    with start_in_thread(store) as srv:
        yield store, camp, srv.url, admin, ann


def card_texts(page) -> list[str]:
    return page.locator("#cards .card .text").all_inner_texts()


def arrange_by_keyboard(page, target: list[str]) -> None:
    """Focus a completion and press Shift+ArrowUp until it sits at its target place."""
    for t, text in enumerate(target):
        p = card_texts(page).index(text)
        page.locator("#cards .card").nth(p).focus()
        for _ in range(p - t):
            page.keyboard.press("Shift+ArrowUp")
    assert card_texts(page) == target


def arrange_by_buttons(page, target: list[str]) -> None:
    for t, text in enumerate(target):
        for _ in range(card_texts(page).index(text) - t):
            page.locator("#cards .card").nth(card_texts(page).index(text)).locator("button.up").click()
    assert card_texts(page) == target


def confirm_if_asked(page) -> None:
    """An order left exactly as shuffled asks for confirmation (issue 16); the labeler means it here."""
    if page.locator("#confirm-box").is_visible():
        page.get_by_role("button", name="Yes, submit this order").click()


def test_labeler_ranks_ties_skips_and_export_holds_exactly_that(server, browser):
    store, camp, url, admin, ann = server
    out = artifacts()
    page = browser.new_page(viewport={"width": 1000, "height": 900})
    dialogs, errors = [], []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))

    page.goto(labeler_link(url, ann))
    page.get_by_role("heading", name="Rank by helpfulness").wait_for()
    assert page.locator("#criterion").inner_text() == "helpfulness"
    assert "token" not in page.url  # the token left the address bar
    assert page.locator("#progress").inner_text() == "0 of 4"
    page.screenshot(path=str(out / "labeling-instructions.png"), full_page=True)
    page.keyboard.press("Enter")  # "Start labeling" has the focus

    expected = {}
    for _ in range(4):
        page.locator("#task").wait_for(state="visible")
        prompt = page.locator("#prompt").inner_text()
        shown = card_texts(page)
        if prompt.startswith("Tell me about"):
            # model output containing markup is visible as literal text, and nothing ran
            assert page.get_by_text('<script>window.__pwned = 1; alert("script ran")</script>', exact=False).is_visible()
            assert page.get_by_text("<img src=x onerror=", exact=False).is_visible()
            assert page.locator("#prompt").inner_text() == ITEMS[0]["prompt"]
            assert page.locator("#cards img, #cards script, #prompt b").count() == 0
            target = [ITEMS[0]["completions"][2], XSS_IMG, XSS_SCRIPT]
            arrange_by_keyboard(page, target)
            page.locator("#cards .card").nth(1).focus()
            page.keyboard.press("t")  # the two script-y replies are equally bad
            assert page.locator("#cards .card .rank").all_inner_texts() == ["1", "=2", "=2"]
            page.screenshot(path=str(out / "labeling-ranking.png"), full_page=True)
            expected["xss"] = (target, [[XSS_IMG, XSS_SCRIPT]], False)
            page.keyboard.press("Control+Enter")
        elif prompt.startswith("How do I cook"):
            c = ITEMS[1]["completions"]
            target = [c[0], c[3], c[1], c[2]]
            arrange_by_buttons(page, target)
            expected["rice"] = (target, [], False)
            page.get_by_role("button", name="Submit ranking").click()
            confirm_if_asked(page)
        elif prompt.startswith("asdf"):
            page.get_by_role("button", name="Skip this item…").click()
            page.select_option("#skip-kind", "unreadable")
            page.fill("#skip-note", "keyboard mash")
            page.get_by_role("button", name="Confirm skip").click()
            expected["skipme"] = ([], [], True)
        else:
            assert prompt == GOLD["prompt"]
            expected["gold"] = (shown, [], False)  # submits the order as shown, and confirms it
            page.keyboard.press("Control+Enter")
            page.get_by_role("alertdialog").wait_for()
            page.get_by_role("button", name="Yes, submit this order").click()
        page.wait_for_function("s => document.querySelector('#prompt').textContent !== s || "
                               "!document.querySelector('#done').hidden", arg=prompt)
    page.get_by_role("heading", name="All done, thank you").wait_for()
    assert page.locator("#progress").inner_text() == "4 of 4"
    assert page.evaluate("typeof window.__pwned") == "undefined"
    assert dialogs == [] and errors == []

    records = {r["prompt_id"]: r for r in label_records(store, camp)}
    assert set(records) == set(expected)
    for pid, (target, ties, skipped) in expected.items():
        rec = records[pid]
        assert [rec["completions"][i] for i in rec["ranking"]] == target, pid
        assert [[rec["completions"][i] for i in g] for g in rec.get("ties", [])] == ties, pid
        assert rec.get("skipped", False) == skipped and rec["labeler"] == "ann"
    assert records["skipme"]["skip_reason"] == "unreadable: keyboard mash"

    # two scripted labelers fill the campaign so the admin page has agreement figures to show
    from rlhf.feedback.simulate import simulate_labelers

    simulate_labelers(url, admin, "length", 2, noise=2.0, seed=3)
    admin_page = browser.new_page(viewport={"width": 1200, "height": 800})
    admin_page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    admin_page.goto(admin_link(url, admin))
    admin_page.get_by_role("row", name="sim-2").wait_for()
    assert admin_page.get_by_role("row", name="ann").locator("td").first.inner_text() == "4 of 4"
    assert "Kendall's W" in admin_page.locator("#campaign-stats").inner_text()
    admin_page.screenshot(path=str(out / "labeling-admin.png"), full_page=True)

    # a labeler's token opens no admin data
    spy = browser.new_page()
    spy.goto(admin_link(url, ann))
    spy.get_by_text("admin only").wait_for()
    assert spy.locator("#overview").is_hidden() and dialogs == []
