"""The dashboard end to end in headless Chromium, against the real API, a Celery worker, the inference
server and a tiny real model: sign in with a key, upload (a refused file, then a good one), estimate,
submit, watch the job finish with its loss curve and heat map drawn, read the report, download the
adapter, follow the live jobs list, cancel a job, chat with the adapter, sign out.

What the pages show is checked against what the API answers for the same thing. A screenshot of each
page goes to ``bench/results/ui/``.
"""

from __future__ import annotations

import io
import json
import re
import tarfile

import httpx
import pytest

from tests.service.conftest import KEYS, TINY_HYPERPARAMETERS, to_jsonl, training_lines

pytestmark = pytest.mark.service

JOB_STEPS = 9
# The service tests' tiny settings, with short evaluation replies and two retention probes, so the report
# has every section and the job ends in well under a minute.
HYPERPARAMETERS = {**TINY_HYPERPARAMETERS, "eval_max_new_tokens": 24, "eval_probes": 2}
JOB_TIMEOUT_MS = 240_000
TRAINING_STAGES = ("router_pretraining", "molora", "uco", "train")

# Every form control must have a label (or an aria-label); returns the ones that do not.
UNLABELLED_CONTROLS = """() => [...document.querySelectorAll('input, select, textarea')]
  .filter((c) => c.type !== 'hidden' && !c.labels.length && !c.getAttribute('aria-label') && !c.closest('[hidden]'))
  .map((c) => c.outerHTML.slice(0, 120))"""

# What a Chart.js chart holds and whether its elements were laid out on the canvas.
CHART_STATE = """(id) => {
  const canvas = document.getElementById(id);
  const chart = window.Chart.getChart(canvas);
  if (!chart) return null;
  const area = chart.chartArea;
  return {
    width: canvas.width, height: canvas.height,
    datasets: chart.data.datasets.map((d, i) => ({
      label: d.label,
      data: d.data,
      drawn: chart.getDatasetMeta(i).data.filter((e) => Number.isFinite(e.x) && Number.isFinite(e.y)
        && e.x >= area.left - 1 && e.x <= area.right + 1 && e.y >= area.top - 1 && e.y <= area.bottom + 1).length,
    })),
  };
}"""

# Share of the canvas's pixels that are painted (not transparent): a drawn chart is far from empty.
PAINTED = """(id) => {
  const canvas = document.getElementById(id);
  const pixels = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
  let painted = 0;
  for (let i = 3; i < pixels.length; i += 4) if (pixels[i] > 0) painted += 1;
  return painted / (canvas.width * canvas.height);
}"""


def bad_lines() -> bytes:
    """A file the validator refuses: good lines, broken JSON, an unknown role and a call to an unknown function."""
    good = training_lines(n_tool=6, n_general=6)
    lines = [json.dumps(line) for line in good]
    lines[1] = '{"messages": [{"role": "user", "content": "hi"}'
    lines[4] = json.dumps({"messages": [{"role": "robot", "content": "beep"}, {"role": "assistant", "content": "ok"}]})
    bad_call = dict(good[0])
    bad_call["messages"] = [good[0]["messages"][0], {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}]}]
    lines[7] = json.dumps(bad_call)
    return ("\n".join(lines) + "\n").encode()


def pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def assert_labelled(page) -> None:
    unlabelled = page.evaluate(UNLABELLED_CONTROLS)
    assert not unlabelled, f"form controls without a label on {page.url}: {unlabelled}"


def sign_in(page, key: str) -> None:
    """Sign in through the form, from the keyboard (the key field has focus when the page opens)."""
    page.goto("/ui")
    page.get_by_label("API key").wait_for()
    assert page.evaluate("document.activeElement.id") == "api-key", "the key field has focus"
    page.keyboard.type(key)
    page.keyboard.press("Enter")
    page.get_by_role("heading", name="Jobs", exact=True).wait_for()


def ask_in_chat(page, api: httpx.Client, model: str, tool_choice: str, max_tokens: int):
    """Send the playground's example question with its example tools; returns the assistant turn on the page
    and the API's answer to the same request."""
    page.get_by_label("Model", exact=True).select_option(model)
    page.get_by_label("Tool choice").select_option(tool_choice)
    page.get_by_label("Max tokens").fill(str(max_tokens))
    tools = json.loads(page.get_by_label("Tools (JSON)").input_value())
    message = page.get_by_label("Your message").input_value()
    page.get_by_role("button", name="Send").click()
    answer = page.locator(".turn-assistant").last
    answer.wait_for(timeout=120_000)
    reply = api.post("/v1/chat/completions", json={
        "model": model, "messages": [{"role": "user", "content": message}], "max_tokens": max_tokens,
        "temperature": 0, "tools": tools, "tool_choice": tool_choice})
    assert reply.status_code == 200, reply.text
    return answer, reply.json()["choices"][0]


def assert_shows(answer, choice: dict) -> None:
    """The assistant turn on the page shows the API's answer: its calls (name and arguments), or its text."""
    calls = choice["message"].get("tool_calls") or []
    assert answer.locator(".tool-name").all_inner_texts() == [c["function"]["name"] for c in calls]
    shown_args = [json.loads(text) for text in answer.locator(".tool-args").all_text_contents()]
    assert shown_args == [json.loads(c["function"]["arguments"]) for c in calls]
    if choice["message"].get("content"):
        assert answer.locator(".content").text_content() == choice["message"]["content"]
    assert f"finish: {choice['finish_reason']}" in answer.locator(".meta").inner_text()


def all_events(client: httpx.Client, job_id: str) -> list[dict]:
    events, after = [], 0
    while True:
        page = client.get(f"/jobs/{job_id}/events", params={"after": after, "limit": 1000}).json()
        events += page["data"]
        if not page["has_more"]:
            return events
        after = page["data"][-1]["seq"]


def test_dashboard_end_to_end(ui_service, ui_worker, ui_inference, page, screenshots, tmp_path):
    api = ui_service.client("alice")

    # -- sign in, from the keyboard --------------------------------------------------------------
    page.goto("/ui")
    key = page.get_by_label("API key")
    key.wait_for()
    assert_labelled(page)
    key.fill("sk-wrong-key")
    page.keyboard.press("Enter")
    page.get_by_role("alert").filter(has_text="not valid").wait_for()
    page.screenshot(path=screenshots / "01-sign-in.png", full_page=True)
    sign_in(page, KEYS["alice"])
    assert page.locator("#tenant").inner_text() == "alice"
    cookie = next(c for c in page.context.cookies() if c["name"] == "citi_session")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    assert page.evaluate("document.cookie") == "", "the session cookie is out of the page's reach"

    # -- new job: a refused upload lists the validator's line errors -----------------------------
    page.get_by_role("link", name="New job", exact=True).first.click()
    page.get_by_role("heading", name="New fine-tuning job").wait_for()
    assert_labelled(page)
    refused = api.post("/v1/files", files={"file": ("broken.jsonl", bad_lines())})
    assert refused.status_code == 400
    expected = [(str(d["line"]), d["code"], d["message"]) for d in refused.json()["error"]["details"]]
    page.get_by_label("JSONL file, one chat example a line").set_input_files(
        {"name": "broken.jsonl", "mimeType": "application/jsonl", "buffer": bad_lines()})
    page.get_by_role("button", name="Upload and check").click()
    table = page.locator("#upload-errors")
    table.wait_for()
    shown = [tuple(row.locator("td").all_inner_texts()) for row in table.locator("tbody tr").all()]
    assert shown == expected, "the page lists exactly the problems the API reported"
    assert {"2", "5", "8"} <= {line for line, _, _ in shown}
    assert page.get_by_role("alert").first.inner_text().startswith("the file has")
    page.screenshot(path=screenshots / "02-new-job-refused-upload.png", full_page=True)

    # -- a good upload, the form, the estimate ----------------------------------------------------
    page.get_by_label("JSONL file, one chat example a line").set_input_files(
        {"name": "weather.jsonl", "mimeType": "application/jsonl", "buffer": to_jsonl(training_lines())})
    page.get_by_role("button", name="Upload and check").click()
    page.locator("#upload-ok").wait_for()
    assert "24 examples (16 tool, 8 general)" in page.locator("#upload-ok").inner_text()
    file_id = page.locator("#training-file").input_value()
    assert api.get(f"/v1/files/{file_id}").json()["filename"] == "weather.jsonl"

    page.get_by_label("Base model", exact=True).select_option(ui_service.model_dir)
    page.locator("#method-citi").check()
    page.get_by_label("Steps", exact=True).fill(str(JOB_STEPS))
    page.get_by_label("molora fraction", exact=True).fill("0.25")
    page.get_by_label("uco fraction", exact=True).fill("0.1")
    page.get_by_text("More options").click()
    page.get_by_label("Suffix of the fine-tuned model name").fill("ui")
    page.get_by_label("Seed", exact=True).fill("3")
    page.get_by_label("Hyperparameters (JSON object)").fill(json.dumps(HYPERPARAMETERS))
    body = {"model": ui_service.model_dir, "training_file": file_id, "budget": {"max_steps": JOB_STEPS},
            "method": {"type": "citi", "hyperparameters": HYPERPARAMETERS}, "suffix": "ui", "seed": 3,
            "components": {"molora_fraction": 0.25, "uco_fraction": 0.1,
                           "num_experts": int(page.get_by_label("num experts", exact=True).input_value()),
                           "rank": int(page.get_by_label("rank", exact=True).input_value())}}
    estimate = api.post("/jobs/estimate", json=body).json()
    page.get_by_role("button", name="Estimate").click()
    page.locator("#estimate-steps").wait_for()
    assert page.locator("#estimate-steps").inner_text().startswith(f"{estimate['steps']['total']} (")
    assert estimate["steps"]["total"] == JOB_STEPS
    assert page.locator("#estimate-budget").inner_text().startswith("fits")
    page.screenshot(path=screenshots / "03-new-job-estimate.png", full_page=True)

    # -- submit, and watch it run to the end ------------------------------------------------------
    page.get_by_role("button", name="Start job").click()
    page.wait_for_url(re.compile(r"/ui/jobs/ftjob-[0-9a-f]+$"))
    job_id = page.url.rsplit("/", 1)[1]
    job = api.get(f"/jobs/{job_id}").json()
    assert job["budget"]["max_steps"] == JOB_STEPS and job["components"]["molora_fraction"] == 0.25
    assert job["suffix"] == "ui" and job["seed"] == 3
    page.wait_for_function("() => { const c = document.getElementById('loss-chart');"
                           " const ch = c && window.Chart.getChart(c); return ch && ch.data.datasets[0].data.length > 0; }",
                           timeout=JOB_TIMEOUT_MS)
    page.screenshot(path=screenshots / "04-job-running.png", full_page=True)
    page.locator("#job-status", has_text="succeeded").wait_for(timeout=JOB_TIMEOUT_MS)
    job = api.get(f"/jobs/{job_id}").json()
    assert job["status"] == "succeeded", ui_service.tail_logs()

    # The loss curve holds every training step the job reported, drawn inside the chart area.
    events = all_events(api, job_id)
    steps = [e["data"] for e in events if e["type"] == "progress" and e["data"].get("stage") in TRAINING_STAGES
             and e["data"].get("loss") is not None]
    assert len(steps) == JOB_STEPS
    page.wait_for_function(f"() => window.Chart.getChart(document.getElementById('loss-chart')).data.datasets[0].data.length >= {len(steps)}")
    curve = page.evaluate(CHART_STATE, "loss-chart")
    loss, routing = curve["datasets"]
    assert [(p["x"], p["y"]) for p in loss["data"]] == [(s["step"], s["loss"]) for s in steps]
    expected_routing = [(s["step"], s["routing_loss"]) for s in steps if s.get("routing_loss") is not None]
    assert expected_routing, "a citi job reports a routing loss"
    assert [(p["x"], p["y"]) for p in routing["data"]] == expected_routing
    assert loss["drawn"] == len(loss["data"]) and routing["drawn"] == len(routing["data"])
    assert page.evaluate(PAINTED, "loss-chart") > 0.01

    # The heat maps show every component of importance.json, the chosen ones marked, on both panels.
    importance = api.get(f"/ui/api/jobs/{job_id}/importance").json()
    assert sorted(importance["molora"]) == sorted(job["selected_components"]["molora"])
    page.locator("#heat-tool").wait_for()
    for canvas, which in (("heat-tool", "tool"), ("heat-general", "general")):
        page.wait_for_function(f"() => !!window.Chart.getChart(document.getElementById('{canvas}'))")
        state = page.evaluate(CHART_STATE, canvas)
        cells = state["datasets"][0]["data"]
        assert len(cells) == len(importance["components"]) and state["datasets"][0]["drawn"] == len(cells)
        assert {c["name"]: c["v"] for c in cells} == {r["name"]: r[which] for r in importance["components"]}
        assert sorted(c["name"] for c in cells if "M" in c["mark"]) == sorted(importance["molora"])
        assert sorted(c["name"] for c in cells if "U" in c["mark"]) == sorted(importance["uco"])
        assert page.evaluate(PAINTED, canvas) > 0.2, "the cells fill most of the chart"
    assert page.locator("#importance-table tbody tr").count() == len(importance["components"])

    # The report shows the numbers of report.json.
    report = api.get(f"/jobs/{job_id}/report").json()
    page.locator("#report-tool-accuracy").wait_for()
    assert page.locator("#report-tool-accuracy").inner_text() == (
        f"{pct(report['summary']['tool_accuracy'])} of {report['summary']['n_test']} cases")
    summary = report["summary"]
    assert summary["general_retention"] is not None and summary["n_probes"] == 2
    assert page.locator("#report-retention").inner_text() == f"{summary['general_retention']:.4f} (2 probes)"
    # ... with the retention when unrelated tools are offered, the headline, and the router's separation.
    assert page.locator("#report-retention-headline").inner_text() == f"{summary['headline_retention']:.4f}"
    router = report["router"]
    rows = page.locator("#router-separation tbody tr")
    assert rows.count() == 3
    for row, key in zip(rows.all(), ("general", "general_with_tools", "tool_call"), strict=True):
        assert row.locator("td").all_inner_texts() == [f"{router[key]['mean']:.4f}", str(router[key]["tokens"])]
    assert page.locator("#router-per-layer tbody tr").count() == len(job["selected_components"]["molora"])
    categories = page.locator("#category-table tbody tr")
    assert categories.count() == len(report["tool"]["per_category"])
    for row, (name, c) in zip(categories.all(), report["tool"]["per_category"].items(), strict=True):
        assert row.locator("th").inner_text() == name
        assert row.locator("td").all_inner_texts() == [str(c["n"]), str(c["correct"]), pct(c["accuracy"])]
    page.screenshot(path=screenshots / "05-job-succeeded.png", full_page=True)

    # -- download the adapter ---------------------------------------------------------------------
    with page.expect_download() as download:
        page.get_by_role("link", name="Download adapter (.tar.gz)").click()
    archive = tmp_path / "adapter.tar.gz"
    download.value.save_as(archive)
    with tarfile.open(archive) as tar:
        names = {name.split("/", 1)[1] for name in tar.getnames()}
        member = tar.extractfile(next(m for m in tar.getmembers() if m.name.endswith("/importance.json")))
        assert json.load(io.BytesIO(member.read())) == importance
    assert {"adapter_config.json", "adapter_model.safetensors", "importance.json", "report.json"} <= names
    assert names == set(job["adapter_files"])

    # -- the jobs list updates by itself; cancel a job from its page ------------------------------
    page.get_by_role("link", name="Jobs", exact=True).click()
    page.locator(f'#jobs-table tr[data-id="{job_id}"][data-status="succeeded"]').wait_for()
    assert_labelled(page)
    # Slow enough that the cancel always lands first: the steps the budget allows, and epochs enough to fill them
    # (the small file alone gives about 50 steps, done in seconds).
    slow = {**body, "budget": {"max_steps": 400}, "suffix": "slow",
            "method": {"type": "citi", "hyperparameters": {**HYPERPARAMETERS, "epochs_molora": 40}}}
    second = api.post("/jobs", json=slow).json()["id"]
    row = page.locator(f'#jobs-table tr[data-id="{second}"]')
    row.wait_for(timeout=10_000)  # no reload: the list polls
    page.screenshot(path=screenshots / "06-jobs.png", full_page=True)
    row.get_by_role("link").focus()
    page.keyboard.press("Enter")
    page.wait_for_url(f"**/ui/jobs/{second}")
    page.once("dialog", lambda dialog: dialog.accept())
    page.get_by_role("button", name="Cancel job").click()
    page.locator("#job-status", has_text="cancelled").wait_for(timeout=120_000)
    assert api.get(f"/jobs/{second}").json()["status"] == "cancelled"

    # -- chat with the adapter --------------------------------------------------------------------
    model = job["fine_tuned_model"]
    page.goto(f"/ui/jobs/{job_id}")
    page.get_by_role("link", name="Try it in the chat").click()
    page.get_by_role("heading", name="Chat playground").wait_for()
    assert page.get_by_label("Model", exact=True).input_value() == model
    assert_labelled(page)
    answer, choice = ask_in_chat(page, api, model, "required", 24)
    assert_shows(answer, choice)
    page.screenshot(path=screenshots / "07-chat.png", full_page=True)

    # -- sign out; a session ended elsewhere returns the page to the sign-in form ------------------
    page.get_by_role("button", name="Sign out").click()
    page.get_by_label("API key").wait_for()
    with httpx.Client(base_url=ui_service.url, cookies={"citi_session": cookie["value"]}) as old:
        assert old.get("/jobs").status_code == 401, "the signed-out session is refused"
    sign_in(page, KEYS["alice"])
    token = next(c["value"] for c in page.context.cookies() if c["name"] == "citi_session")
    with httpx.Client(base_url=ui_service.url, cookies={"citi_session": token}) as other_tab:
        csrf = other_tab.get("/ui/session").json()["csrf_token"]
        assert other_tab.delete("/ui/session", headers={"X-CSRF-Token": csrf}).status_code == 204
    page.get_by_role("status").filter(has_text="Your session has ended").wait_for(timeout=10_000)
    assert page.get_by_label("API key").is_visible()

    assert not page.problems, page.problems
    api.close()

