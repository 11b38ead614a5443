"""A chat user in real headless Chromium: ask, pick, edit, both bad, see the history, delete an entry
and then everything; the database holds exactly that; markup in a question stays text.

Screenshots of the choice, the edit, the conversation and the history go to $RLHF_ARTIFACTS (default
artifacts/ in the repository); docs/screenshots/personal-*.png are copies of them."""

from pathlib import Path

import pytest

from conftest import CHROMIUM, artifacts

from rlhf.feedback.server import start_in_thread
from rlhf.feedback.store import open_store
from rlhf.personal.api import chat_link, create_chat_app
from rlhf.personal.policy import ChatPolicy, ChatPolicyConfig
from rlhf.personal.store import PersonalStore

pytestmark = [pytest.mark.browser,
              pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"{CHROMIUM} missing: apt-get install -y chromium")]
XSS = '<script>window.__pwned = 1</script><img src=x onerror="window.__pwned = 2"> how do I cook rice'


@pytest.fixture()
def server(tmp_path):
    store = open_store(tmp_path / "labels.sqlite")
    pstore = PersonalStore(store)
    _, token = pstore.add_user("ann")
    chat = ChatPolicy(ChatPolicyConfig(policy="bundled"), device="cpu")  # the bundled model: real-looking replies
    with start_in_thread(store, app=create_chat_app(store, chat)) as srv:
        yield pstore, srv.url, token


def ask(page, text: str) -> list[str]:
    page.fill("#prompt", text)
    page.keyboard.press("Enter")
    page.locator("#choice").wait_for(state="visible")
    return [page.locator(f"#reply-{i} .text").inner_text() for i in (0, 1)]


def test_chat_ask_pick_edit_history_delete(server, browser):
    pstore, url, token = server
    out = artifacts()
    page = browser.new_page(viewport={"width": 1100, "height": 820})
    dialogs, errors = [], []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.accept()))
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))

    page.goto(chat_link(url, token))
    page.get_by_text("· ann").wait_for()
    assert page.url == url + "/chat"  # the token left the address bar
    assert page.locator("#mode").inner_text() == "plain replies (no personal model yet)"
    assert page.locator("#count").inner_text() == "0 choices"

    # 1. ask, pick B, edit it, save
    first = ask(page, "my house is too hot")
    assert all(first) and page.locator("#your-question").inner_text() == "my house is too hot"
    page.screenshot(path=str(out / "personal-chat-choice.png"), full_page=True)
    page.get_by_role("button", name="I prefer B").click()
    assert page.locator("#edit").input_value() == first[1]
    assert page.locator("#reply-1").get_attribute("class") == "reply chosen"
    edited = first[1] + " Keep a cold drink nearby."
    page.fill("#edit", edited)
    page.screenshot(path=str(out / "personal-chat-edit.png"), full_page=True)
    page.get_by_role("button", name="Save and go on").click()
    page.get_by_text("Saved. Ask the next question").wait_for()
    assert page.locator("#count").inner_text() == "1 choice"
    assert page.locator("#transcript .assistant").last.inner_text().startswith(edited)

    # 2. markup in a question is text; both replies are bad
    ask(page, XSS)
    assert page.locator("#your-question").inner_text() == XSS
    assert page.locator("#choice img, #choice script, #transcript img").count() == 0
    page.get_by_role("button", name="Both are bad").click()
    assert page.locator("#edit").input_value() == ""
    page.get_by_role("button", name="Save and go on").click()
    page.get_by_text("Saved. Ask the next question").wait_for()

    # 3. pick A as it is
    third = ask(page, "how can I save money")
    page.get_by_role("button", name="I prefer A").click()
    page.keyboard.press("Control+Enter")
    page.wait_for_function("() => document.querySelector('#count').textContent === '3 choices'")
    page.screenshot(path=str(out / "personal-chat-conversation.png"), full_page=True)

    recs = pstore.feedback("ann")
    assert [(r.prompt, r.choice, r.edit) for r in recs] == [("my house is too hot", 1, edited), (XSS, None, None),
                                                            ("how can I save money", 0, None)]
    assert recs[0].replies == first and recs[2].replies == third and all(r.model_version == "bundled" for r in recs)

    # 4. the history: newest first, with the edit; delete one entry, then everything
    page.get_by_role("button", name="My history").click()
    page.locator("#history-list > li").nth(2).wait_for()
    items = page.locator("#history-list > li")
    assert [items.nth(i).locator(".choice").inner_text() for i in range(3)] == ["preferred A", "both bad", "preferred B"]
    assert edited in items.nth(2).locator(".edited").inner_text()
    page.screenshot(path=str(out / "personal-chat-history.png"), full_page=True)
    items.nth(1).get_by_role("button", name="Delete this entry").click()
    page.wait_for_function("() => document.querySelectorAll('#history-list > li').length === 2")
    assert [r.prompt for r in pstore.feedback("ann")] == ["my house is too hot", "how can I save money"]
    page.get_by_role("button", name="Delete all my history").click()
    page.get_by_text("Nothing here yet.").wait_for()
    assert dialogs == ["Delete your whole history? This cannot be undone."]
    assert pstore.history(pstore.users()[0]) == [] and pstore.feedback() == []
    assert page.locator("#count").inner_text() == "0 choices"
    page.get_by_role("button", name="Back to the chat").click()
    assert page.locator("#prompt").is_visible()
    assert page.evaluate("typeof window.__pwned") == "undefined" and errors == []

    # a link that does not work says so
    stranger = browser.new_page()
    stranger.goto(url + "/chat/not-a-real-token")
    stranger.get_by_text("This link does not work").wait_for()
    assert stranger.locator("#ask").is_disabled()
