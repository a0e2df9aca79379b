// The --dev demo page in headless Chromium: two tabs as users 1 and 2 (the links the banner
// prints, token in the fragment) exchange a P2P message with its ack, see each other's presence
// and typing, and talk in a room. Screenshots go to target/sdk-demo.png (user 2) and
// target/sdk-demo-user1.png.

import assert from "node:assert/strict";
import { existsSync, mkdirSync, mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { test } from "node:test";
import { type Page, chromium } from "playwright-core";

import { ROOT, killServer, startServer, waitFor } from "./harness.js";

const CHROMIUM = process.env.CHROMIUM ?? "/usr/bin/chromium";
const BUNDLE = join(ROOT, "clients/typescript/dist/customws.min.js");

test("two users on the demo page: message with ack, presence, typing, room", async () => {
  assert.ok(existsSync(CHROMIUM), `${CHROMIUM} is missing: run .ci/setup (installs the chromium package)`);
  assert.ok(existsSync(BUNDLE), `${BUNDLE} is missing: run npm run build in clients/typescript first`);
  const server = await startServer(["--dev"]);
  const profile = mkdtempSync(join(tmpdir(), "customws-demo-"));
  const browser = await chromium.launchPersistentContext(profile, {
    executablePath: CHROMIUM,
    headless: true,
    viewport: { width: 900, height: 560 },
    args: [
      "--headless",
      "--no-sandbox",
      "--disable-gpu",
      "--disable-quic",
      "--no-first-run",
      "--disable-background-networking",
      "--disable-component-update",
      "--disable-sync",
    ],
  });
  const errors: string[] = [];
  try {
    // The banner prints one demo link per user.
    const links = await waitFor(() => {
      const found = server.stdout().match(/http:\/\/\S+\/demo#token=\S+/g);
      return found && found.length === 2 ? found : undefined;
    }, 5000, "demo links in the --dev banner");
    assert.ok(links[0]!.startsWith(`http://127.0.0.1:${server.port}/demo#token=`), links[0]);
    assert.match(server.stdout(), /serves the SDK bundle/);

    const open = async (link: string): Promise<Page> => {
      const page = await browser.newPage();
      page.on("pageerror", (e) => errors.push(e.message));
      await page.goto(link);
      await page.locator("#state", { hasText: "open" }).waitFor({ timeout: 10_000 });
      return page;
    };
    const one = await open(links[0]!);
    const two = await open(links[1]!);
    assert.equal(await one.locator("#title").textContent(), "customws demo — user 1");
    assert.equal(await two.locator("#peer").inputValue(), "1");

    // Presence: user 2 sees user 1 online (the watch's current status), and user 1 sees user 2 come online.
    await two.locator("#person-1 .status", { hasText: "online" }).waitFor();
    await one.locator("#person-2 .status", { hasText: "online" }).waitFor();

    // Typing: user 1 types, user 2 sees it.
    await one.locator("#text").pressSequentially("hola", { delay: 20 });
    await two.locator("#typing", { hasText: "user 1 is typing" }).waitFor();
    await two.locator("#person-1 .status", { hasText: "typing" }).waitFor();

    // P2P with ack.
    await one.locator("#send").click();
    await one.locator("#log li.sent .ack", { hasText: "✓ delivered" }).waitFor();
    await two.locator("#log li.received", { hasText: "user 1: hola" }).waitFor();

    // And back, so both logs have both directions.
    await two.locator("#text").fill("¡hola! ¿qué tal?");
    await two.locator("#send").click();
    await one.locator("#log li.received", { hasText: "user 2: ¡hola! ¿qué tal?" }).waitFor();

    // A room.
    await one.locator("#join").click();
    await one.locator("#log li.room", { hasText: "joined lobby" }).waitFor();
    await two.locator("#join").click();
    await two.locator("#log li.room", { hasText: "joined lobby" }).waitFor();
    await one.locator("#roomtext").fill("hello room");
    await one.locator("#publish").click();
    await two.locator("#log li.room", { hasText: "[lobby] user 1: hello room" }).waitFor();

    // User 1 types again so that the screenshot shows the indicator.
    await one.locator("#text").pressSequentially("…", { delay: 20 });
    await two.locator("#typing", { hasText: "user 1 is typing" }).waitFor();
    mkdirSync(join(ROOT, "target"), { recursive: true });
    await two.screenshot({ path: join(ROOT, "target/sdk-demo.png") });
    await one.screenshot({ path: join(ROOT, "target/sdk-demo-user1.png") });
    assert.deepEqual(errors, []);
  } finally {
    await browser.close();
    rmSync(profile, { recursive: true, force: true });
    await killServer(server);
  }
});
