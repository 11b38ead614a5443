"""The labeling pages guide people (issue 16), in real headless Chromium: submitting the shuffled order
untouched asks for confirmation and is flagged for the admin; a saved answer is announced and the
next item marked; the last answer can be changed while its item is open; the submit button stays in
view at K = 4 on a 1280×900 window; the admin's per-item view shows disagreements and skip reasons;
an instructions file's own headings are not doubled.

Screenshots go to $RLHF_ARTIFACTS (default artifacts/): labeling-confirm, labeling-saved,
labeling-going-back, labeling-admin-items."""

import json
import re
from pathlib import Path

import pytest

from conftest import CHROMIUM, artifacts
from rlhf.feedback.campaign import import_campaign
from rlhf.feedback.export import label_records
from rlhf.feedback.server import admin_link, labeler_link, start_in_thread
from rlhf.feedback.store import open_store

pytestmark = [pytest.mark.browser,
              pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"{CHROMIUM} missing: apt-get install -y chromium")]

# Replies about as long as the demo's (48 new tokens) and one four times that, so the page is taller
# than a 900-pixel window and only a docked submit row stays in view.
LONG = ("Thank you for asking! The quickest relief is to open the windows on opposite sides of the house at night, "
        "close the curtains on the sunny side during the day, and run a fan so that it pushes the warm air out "
        "rather than around the room. ")
ITEMS = [
    {"prompt_id": "hot", "prompt": "My house is too hot in the afternoon. What can I do without air conditioning?",
     "completions": [LONG + "Drink water.", LONG * 4, "Whatever. Buy an air conditioner.", "I like turtles."]},
    {"prompt_id": "rice", "prompt": "How do I cook rice?",
     "completions": ["Rinse it, add twice the water, simmer 18 minutes, rest it covered.", "Boil it.",
                     "Rice is a grain.", "Use a rice cooker and follow the marks on the bowl."]},
    {"prompt_id": "sleep", "prompt": "How can I sleep better?",
     "completions": ["Keep a regular bedtime and a dark, cool room.", "Sleep more.", "No idea.", "Count sheep, obviously."]},
]
INSTRUCTIONS = """# Rank by helpfulness

Read the prompt, then every completion.

## How to rank

- The reply that helps most goes to the top.
- Mark a tie only when you truly cannot choose.
"""


@pytest.fixture()
def campaign(tmp_path):
    store = open_store(tmp_path / "labels.sqlite")
    comp = tmp_path / "c.jsonl"
    comp.write_text("".join(json.dumps(r) + "\n" for r in ITEMS), encoding="utf-8")
    (tmp_path / "instructions.md").write_text(INSTRUCTIONS, encoding="utf-8")
    camp = import_campaign(store, comp, "helpfulness", 2, tmp_path / "instructions.md", name="guidance")
    _, admin = store.add_user("admin", "admin", None)
    tokens = {n: store.add_user(n, "labeler", camp.id)[1] for n in ("ann", "bob")}
    with start_in_thread(store) as srv:
        yield store, camp, srv.url, admin, tokens


def open_labeler(browser, url, token, errors, size=(1280, 900)):
    page = browser.new_page(viewport={"width": size[0], "height": size[1]})
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("dialog", lambda d: (errors.append("dialog: " + d.message), d.dismiss()))
    page.goto(labeler_link(url, token))
    page.get_by_role("button", name="Start labeling").click()
    page.locator("#task").wait_for(state="visible")
    return page


def card_texts(page) -> list[str]:
    return page.locator("#cards .card .text").all_inner_texts()


def test_instructions_with_their_own_headings_are_not_doubled(campaign, browser):
    store, camp, url, admin, tokens = campaign
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(labeler_link(url, tokens["ann"]))
    page.get_by_role("button", name="Start labeling").wait_for()
    assert page.locator("h1:visible").all_inner_texts() == ["Rank by helpfulness"]  # the file's title, once
    headings = page.locator("#instructions h1, #instructions h2, #instructions h3").all_inner_texts()
    assert headings.count("How to rank") == 1 and "Using this page" in headings and "Instructions" not in headings


def test_submit_stays_in_view_at_k4_on_1280x900(campaign, browser):
    store, camp, url, admin, tokens = campaign
    errors = []
    page = open_labeler(browser, url, tokens["ann"], errors)
    assert page.locator("#prompt").inner_text() == ITEMS[0]["prompt"] and len(card_texts(page)) == 4
    assert page.evaluate("document.documentElement.scrollHeight") > 900  # the page is taller than the window...
    box = page.get_by_role("button", name="Submit ranking").bounding_box()
    assert page.evaluate("window.scrollY") == 0 and 0 <= box["y"] and box["y"] + box["height"] <= 900  # ...yet it shows
    page.locator("#cards .card").last.scroll_into_view_if_needed()
    box = page.get_by_role("button", name="Submit ranking").bounding_box()
    assert box["y"] + box["height"] <= 900 and errors == []


def test_untouched_order_asks_for_confirmation_and_the_admin_sees_it(campaign, browser):
    store, camp, url, admin, tokens = campaign
    errors, out = [], artifacts()
    page = open_labeler(browser, url, tokens["ann"], errors)
    first_prompt = page.locator("#prompt").inner_text()
    shown = card_texts(page)

    page.get_by_role("button", name="Submit ranking").click()
    confirm = page.get_by_role("alertdialog")
    confirm.wait_for()
    assert "You have not moved anything" in confirm.inner_text()
    assert page.evaluate("document.activeElement.id") == "rank-first"  # the safe choice has the focus
    page.screenshot(path=str(out / "labeling-confirm.png"))
    page.get_by_role("button", name="No, let me rank").click()
    assert confirm.is_hidden() and page.locator("#prompt").inner_text() == first_prompt and label_records(store, camp) == []

    page.keyboard.press("Control+Enter")  # the keyboard path asks too
    confirm.wait_for()
    page.get_by_role("button", name="Yes, submit this order").click()
    page.wait_for_function("p => document.querySelector('#prompt').textContent !== p", arg=first_prompt)
    saved = page.locator("#saved")
    assert saved.is_visible() and "Saved your ranking for “My house is too hot" in saved.inner_text()
    assert "Next prompt below" in saved.inner_text()
    assert re.fullmatch(r"Prompt 2 of \d+", page.locator("#prompt-title").inner_text())
    page.screenshot(path=str(out / "labeling-saved.png"))
    rec = label_records(store, camp)[0]
    assert [rec["completions"][i] for i in rec["ranking"]] == shown  # stored as shown, as confirmed

    # a ranked answer goes straight through
    second = page.locator("#prompt").inner_text()
    page.locator("#cards .card").nth(1).locator("button.up").click()
    page.get_by_role("button", name="Submit ranking").click()
    page.wait_for_function("p => document.querySelector('#prompt').textContent !== p", arg=second)
    assert page.get_by_role("alertdialog").is_hidden() and len(label_records(store, camp)) == 2

    admin_page = browser.new_page(viewport={"width": 1280, "height": 900})
    admin_page.goto(admin_link(url, admin))
    row = admin_page.get_by_role("row", name=re.compile("^ann"))
    row.wait_for()
    cell = row.locator("td").last
    assert cell.inner_text().startswith("1 (") and "warn" in cell.get_attribute("class")
    items = admin_page.locator("#items tbody tr")
    items.first.wait_for()
    assert items.count() == 1 and items.first.locator("th").inner_text() == "hot"  # only the as-shown one needs a look
    assert errors == []


def test_going_back_changes_the_last_answer_until_the_item_is_complete(campaign, browser):
    store, camp, url, admin, tokens = campaign
    errors, out = [], artifacts()
    page = open_labeler(browser, url, tokens["ann"], errors)
    assert page.locator("#back").is_hidden()  # nothing answered yet
    first_prompt = page.locator("#prompt").inner_text()
    page.locator("#cards .card").nth(0).focus()
    page.keyboard.press("Shift+ArrowDown")
    submitted = card_texts(page)
    page.keyboard.press("Control+Enter")
    page.wait_for_function("p => document.querySelector('#prompt').textContent !== p", arg=first_prompt)
    second_prompt = page.locator("#prompt").inner_text()

    page.get_by_role("button", name="← Change my last answer").click()
    page.locator("#revising").wait_for(state="visible")
    assert page.locator("#prompt").inner_text() == first_prompt and card_texts(page) == submitted  # as ranked
    assert page.locator("#prompt-title").inner_text() == "Prompt of your last answer"
    page.locator("#cards .card").nth(3).focus()
    for _ in range(3):
        page.keyboard.press("Shift+ArrowUp")  # the last becomes the best
    changed = card_texts(page)
    page.screenshot(path=str(out / "labeling-going-back.png"))
    page.get_by_role("button", name="Submit ranking").click()
    page.wait_for_function("p => document.querySelector('#prompt').textContent === p", arg=second_prompt)
    assert "Changed your answer for" in page.locator("#saved").inner_text() and page.locator("#revising").is_hidden()
    rec = next(r for r in label_records(store, camp) if r["labeler"] == "ann")
    assert [rec["completions"][i] for i in rec["ranking"]] == changed and len(label_records(store, camp)) == 1

    # bob ranks that item too: it has its 2 rankings, so ann's answer is final now
    from rlhf.feedback.simulate import label_as

    label_as(url, tokens["bob"], "length", 0.0, max_items=1)
    page.get_by_role("button", name="← Change my last answer").click()
    page.get_by_text("can no longer be changed").wait_for()
    assert page.locator("#back").is_hidden() and page.locator("#prompt").inner_text() == second_prompt
    assert errors == []


def test_admin_item_view_shows_disagreements_and_skip_reasons(campaign, browser):
    store, camp, url, admin, tokens = campaign
    from rlhf.feedback.simulate import ApiClient

    # ann and bob rank the first item in opposite orders; bob skips the second with a reason
    answers = {}
    for name, flip in (("ann", False), ("bob", True)):
        api = ApiClient(url, tokens[name])
        item = api.request("GET", "/api/next")["item"]
        order = sorted(range(4), key=lambda s: len(item["completions"][s]), reverse=not flip)
        api.request("POST", "/api/submit", json={"item": item["id"], "submission_id": f"{name}-0000001", "ranking": order})
        answers[name] = [item["completions"][s] for s in order]
        api.close()
    api = ApiClient(url, tokens["bob"])
    item = api.request("GET", "/api/next")["item"]
    api.request("POST", "/api/submit", json={"item": item["id"], "submission_id": "bob-0000002", "skipped": True,
                                             "skip_reason": "unreadable: the replies are cut off"})
    api.close()

    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(admin_link(url, admin))
    rows = page.locator("#items tbody tr")
    rows.first.wait_for()
    assert rows.count() == 2  # the disagreement and the skip; the untouched third item is not listed
    assert rows.first.locator("th").inner_text() == "hot"  # lowest agreement first
    assert page.get_by_role("row", name=re.compile("^hot")).locator("td").nth(2).inner_text() == "0"
    page.get_by_role("button", name="Open item hot").click()
    detail = page.locator("#item-detail")
    detail.wait_for()
    text = detail.inner_text()
    assert "2 of 2 rankings, Kendall's W 0" in text and "consensus (Borda)" in text
    letters = {c: "ABCD"[i] for i, c in enumerate(ITEMS[0]["completions"])}
    assert " > ".join(letters[c] for c in answers["ann"]) in text and " > ".join(letters[c] for c in answers["bob"]) in text
    page.get_by_role("button", name="Open item rice").click()
    page.get_by_text("reason: unreadable: the replies are cut off").wait_for()
    page.select_option("#item-filter", "all")
    assert rows.count() == 3
    # API labelers answer in milliseconds; the median is shown, not rounded to 0
    secs = page.get_by_role("row", name=re.compile("^ann")).locator("td").nth(2).inner_text()
    assert secs not in ("0", "—") and float(secs) > 0
    page.get_by_role("button", name="Open item hot").click()
    page.locator("#items-title").scroll_into_view_if_needed()
    page.screenshot(path=str(out_path := artifacts() / "labeling-admin-items.png"), full_page=True)
    assert out_path.is_file()
