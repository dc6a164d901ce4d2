// Open every page of the built site (site/) in headless Chromium at a laptop's width and report each code block
// or table whose content is wider than its box (hidden behind a scroll bar): exit status 1 if there is one.
// Writes a screenshot of the top of the main pages beside this script.
//
//   mkdocs build --strict && cd docs/layout && npm install --no-save @sparticuz/chromium puppeteer-core \
//     && node check_layout.mjs [width]
//
// @sparticuz/chromium ships a headless Chromium inside the npm package, so nothing else is downloaded.
import chromium from "@sparticuz/chromium";
import { readdirSync, statSync } from "node:fs";
import { join, relative } from "node:path";
import { fileURLToPath, pathToFileURL } from "node:url";
import puppeteer from "puppeteer-core";

const here = fileURLToPath(new URL(".", import.meta.url));
const site = join(here, "..", "..", "site");
const width = Number(process.argv[2] || 1280);
const SCREENSHOTS = ["index.html", "getting-started/index.html", "guide/results/index.html", "guide/doctor/index.html"];

function pages(folder) {
  return readdirSync(folder).flatMap((name) => {
    const path = join(folder, name);
    if (statSync(path).isDirectory()) return name === "assets" ? [] : pages(path);
    return name === "index.html" ? [path] : [];
  });
}

const browser = await puppeteer.launch({
  args: chromium.args,
  executablePath: await chromium.executablePath(),
  headless: true,
  defaultViewport: { width, height: 800 },
});
const page = await browser.newPage();
let clipped = 0;
for (const path of pages(site)) {
  const name = relative(site, path);
  await page.goto(pathToFileURL(path).href, { waitUntil: "load" });
  const wide = await page.evaluate(() =>
    [...document.querySelectorAll("pre > code, .md-typeset__scrollwrap")]
      .filter((box) => box.scrollWidth > box.clientWidth + 1)
      .map((box) => `${box.scrollWidth} > ${box.clientWidth} px: ${box.textContent.replace(/\s+/g, " ").slice(0, 70)}`),
  );
  clipped += wide.length;
  console.log(`${wide.length ? "CLIPPED" : "ok     "} ${name}${wide.map((line) => `\n        ${line}`).join("")}`);
  if (SCREENSHOTS.includes(name)) {
    await page.screenshot({ path: join(here, `${name.replace(/\/?index\.html$/, "").replace(/\//g, "-") || "home"}.png`) });
  }
}
await browser.close();
console.log(`${clipped} clipped code block(s) or table(s) at ${width} px`);
process.exit(clipped ? 1 : 0);
