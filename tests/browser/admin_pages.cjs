// Loads the admin listener's pages (/ui, /docs, /redoc) in headless Chromium (Debian's, driven
// by playwright-core from src/admin/ui/node_modules) and prints one JSON object: per page, its
// HTTP status, console errors, page errors, requests to hosts other than this machine, failed
// requests, what it rendered, and a screenshot saved under OUT_DIR.
//
//   node tests/browser/admin_pages.cjs http://127.0.0.1:9090 OUT_DIR [ADMIN_KEY]
"use strict";

const path = require("path");
const { chromium } = require(path.join(__dirname, "../../src/admin/ui/node_modules/playwright-core"));

const LOCAL_HOSTS = new Set(["127.0.0.1", "localhost", "[::1]", "::1"]);

async function visit(context, base, route, outDir, inspect) {
  const page = await context.newPage();
  const seen = { console_errors: [], page_errors: [], foreign_requests: [], failed_requests: [] };
  page.on("console", (m) => { if (m.type() === "error") seen.console_errors.push(m.text()); });
  page.on("pageerror", (e) => seen.page_errors.push(String(e)));
  page.on("request", (r) => {
    const u = new URL(r.url());
    if ((u.protocol === "http:" || u.protocol === "https:" || u.protocol === "ws:" || u.protocol === "wss:") && !LOCAL_HOSTS.has(u.hostname)) {
      seen.foreign_requests.push(r.url());
    }
  });
  page.on("requestfailed", (r) => seen.failed_requests.push(r.url() + " " + (r.failure() || {}).errorText));
  const response = await page.goto(base + route, { waitUntil: "load", timeout: 30000 });
  seen.status = response ? response.status() : 0;
  try {
    seen.rendered = await inspect(page);
  } catch (e) {
    seen.inspect_error = String(e);
  }
  const file = path.join(outDir, route.replace(/\//g, "") + ".png");
  await page.screenshot({ path: file, fullPage: true });
  seen.screenshot = file;
  await page.close();
  return seen;
}

async function main() {
  const [base, outDir, adminKey] = process.argv.slice(2);
  const browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
    args: [
      "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
      "--disable-quic", "--no-first-run", "--disable-component-update", "--disable-sync",
    ],
  });
  const context = await browser.newContext({
    viewport: { width: 1400, height: 1000 },
    // The browser answers the admin listener's Basic challenge with the key as the password.
    httpCredentials: adminKey ? { username: "admin", password: adminKey } : undefined,
  });
  const result = {};
  result.ui = await visit(context, base, "/ui", outDir, async (page) => {
    // Two refreshes after the first point with traffic: the charts hold what the API had.
    await page.waitForFunction(
      () => window.lumenConsole && window.lumenConsole.refreshes >= 2 &&
        window.lumenConsole.points.some((p) => p.requests_per_s > 0) &&
        Object.keys(window.lumenConsole.charts).length === 6,
      null, { timeout: 20000 });
    return page.evaluate(() => {
      const charts = {};
      for (const [name, u] of Object.entries(window.lumenConsole.charts)) {
        // Per chart: how many points, and per series the values that are there.
        charts[name] = {
          points: u.data[0].length,
          series: u.data.slice(1).map((s) => s.filter((v) => v !== null && v !== undefined)),
          canvas: !!document.querySelector("#chart-" + name + " canvas"),
        };
      }
      const rows = (id) => [...document.querySelectorAll("#" + id + " tbody tr")]
        .map((tr) => [...tr.children].map((td) => td.textContent));
      return {
        charts,
        providers: rows("providers"),
        top_keys: rows("top-keys"),
        top_models: rows("top-models"),
        routes: rows("routes"),
        now_rps: document.getElementById("now-rps").textContent,
        failures: window.lumenConsole.failures,
      };
    });
  });
  result.docs = await visit(context, base, "/docs", outDir, async (page) => {
    await page.waitForSelector(".opblock", { timeout: 20000 });
    return page.evaluate(() => ({
      title: (document.querySelector(".info .title") || {}).textContent,
      operations: document.querySelectorAll(".opblock").length,
    }));
  });
  result.redoc = await visit(context, base, "/redoc", outDir, async (page) => {
    await page.waitForSelector("[data-section-id]", { timeout: 20000 });
    return page.evaluate(() => ({
      title: (document.querySelector("h1") || {}).textContent,
      sections: document.querySelectorAll("[data-section-id]").length,
    }));
  });
  await browser.close();
  process.stdout.write(JSON.stringify(result) + "\n");
}

main().catch((e) => {
  process.stderr.write(String(e && e.stack || e) + "\n");
  process.exit(1);
});
