// Opens the page in headless Chromium (WebGPU on), waits for its result and prints it as
// one JSON line per URL; optionally saves a screenshot of the last page.
//
//   node drive.mjs [--screenshot FILE] [--timeout SECONDS] URL...
//
// Chromium is Debian's (/usr/bin/chromium, or $CHROMIUM); playwright-core drives it and
// downloads nothing.

import { chromium } from "playwright-core";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";

const args = process.argv.slice(2);
let screenshot = null;
let timeoutS = 300;
const urls = [];
for (let i = 0; i < args.length; i++) {
  if (args[i] === "--screenshot") screenshot = args[++i];
  else if (args[i] === "--timeout") timeoutS = Number(args[++i]);
  else urls.push(args[i]);
}
if (urls.length === 0) {
  console.error("usage: node drive.mjs [--screenshot FILE] [--timeout SECONDS] URL...");
  process.exit(2);
}

const profile = mkdtempSync(join(tmpdir(), "slmc-chromium-"));
const context = await chromium.launchPersistentContext(profile, {
  executablePath: process.env.CHROMIUM ?? "/usr/bin/chromium",
  headless: true,
  viewport: { width: 1000, height: 760 },
  args: [
    "--no-sandbox",
    "--enable-unsafe-webgpu",
    "--disable-gpu-sandbox",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-quic",
  ],
});
let failed = false;
try {
  const page = context.pages()[0] ?? (await context.newPage());
  page.on("console", (m) => {
    if (m.type() === "error") console.error(`[page] ${m.text()}`);
  });
  page.on("pageerror", (e) => console.error(`[page] ${e.message}`));
  for (const url of urls) {
    await page.goto(url);
    await page.waitForFunction(() => window.slmcResult !== undefined, null, { timeout: timeoutS * 1000, polling: 250 });
    const result = await page.evaluate(() => window.slmcResult);
    console.log(JSON.stringify({ url, ...result }));
  }
  if (screenshot) await page.screenshot({ path: screenshot, fullPage: true });
} catch (e) {
  console.error(`drive.mjs: ${e.message ?? e}`);
  failed = true;
} finally {
  await context.close();
  rmSync(profile, { recursive: true, force: true });
}
process.exit(failed ? 1 : 0);
