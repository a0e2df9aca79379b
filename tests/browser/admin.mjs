// Drives the admin page in headless Chromium for tests/admin_page.rs.
//
//   node tests/browser/admin.mjs <page url> <api key> <screenshot path>
//
// The Rust test owns the scenario: it writes one command per line on stdin and reads one
// answer line per command on stdout ("ok ..." or "fail ..."). Every wait is bounded.
//
//   login-wrong                 wrong key: the page must refuse it and show no data
//   login                       the right key: the dashboard must appear
//   users <id,id,...>           the connection table must list exactly these users (any order)
//   room <name> <members>       the rooms table must show the room with this member count
//   metric <name> <value>       card #m-<name> must show this value
//   live                        the event stream must be connected
//   search <id>                 search by user id (then `users` shows the result)
//   clear                       back to all users
//   disconnect <id>             click the user's Disconnect button and accept the confirmation
//   status <text>               the status line must contain the text
//   key-in-url                  no request so far may have carried the key in its URL
//   screenshot                  full-page PNG to the screenshot path
//   quit
import { createInterface } from 'node:readline';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { chromium } from 'playwright-core';

const [url, key, screenshot] = process.argv.slice(2);
if (!url || !key || !screenshot) {
  console.error('usage: node admin.mjs <url> <key> <screenshot>');
  process.exit(2);
}
const WAIT = 10_000;
const profile = mkdtempSync(join(tmpdir(), 'customws-chromium-'));
// A fresh profile directory (--user-data-dir) each run, removed at the end.
const browser = await chromium.launchPersistentContext(profile, {
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  headless: true,
  viewport: { width: 1360, height: 860 },
  args: [
    '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
    '--disable-background-networking', '--disable-component-update', '--disable-sync',
  ],
});
const page = browser.pages()[0] || await browser.newPage();
const urls = [];
page.on('request', (request) => urls.push(request.url()));
page.on('pageerror', (error) => console.error('page error:', error.message));
let confirmations = 0;
page.on('dialog', async (dialog) => {
  confirmations += 1;
  await dialog.accept();
});
await page.goto(url);

// The sorted user ids of the connection table's rows.
async function listedUsers() {
  return page.$$eval('#conn-table tbody tr[data-user]', (rows) => rows.map((r) => r.dataset.user).sort());
}

async function until(what, check) {
  const deadline = Date.now() + WAIT;
  let seen;
  for (;;) {
    try {
      seen = await check();
      if (seen === true) return 'ok';
    } catch (e) {
      seen = e.message;
    }
    if (Date.now() > deadline) return `fail ${what}; saw ${JSON.stringify(seen)}`;
    await page.waitForTimeout(100);
  }
}

const commands = {
  async 'login-wrong'() {
    await page.fill('#key', key + '-wrong');
    await page.click('#login-form button[type=submit]');
    return until('the wrong key refused', async () => {
      const error = await page.textContent('#login-error');
      const hidden = await page.$eval('#dashboard', (d) => d.hidden);
      return (error.includes('Wrong API key') && hidden) || { error, hidden };
    });
  },
  async login() {
    await page.fill('#key', key);
    await page.click('#login-form button[type=submit]');
    return until('the dashboard', async () => {
      const shown = await page.$eval('#dashboard', (d) => !d.hidden);
      const stored = await page.evaluate(() => sessionStorage.getItem('customws.apiKey'));
      return (shown && stored !== null) || { shown, stored };
    });
  },
  async users(list) {
    const want = (list || '').split(',').filter(Boolean).sort();
    return until(`users ${want}`, async () => {
      const got = await listedUsers();
      return JSON.stringify(got) === JSON.stringify(want) || got;
    });
  },
  async room(name, members) {
    return until(`room ${name} with ${members}`, async () => {
      const rows = await page.$$eval('#rooms-table tbody tr[data-room]', (trs) =>
        trs.map((tr) => [tr.dataset.room, tr.querySelector('.members').textContent]));
      return rows.some(([r, m]) => r === name && m === members) || rows;
    });
  },
  async metric(name, value) {
    return until(`#m-${name} = ${value}`, async () => {
      const text = (await page.textContent(`#m-${name}`)).trim();
      return text === value || text;
    });
  },
  async live() {
    return until('the live stream', async () => (await page.textContent('#live')) === 'live' || 'offline');
  },
  async search(user) {
    await page.fill('#user-filter', user);
    await page.click('#search button[type=submit]');
    return 'ok';
  },
  async clear() {
    await page.click('#clear');
    return 'ok';
  },
  async disconnect(user) {
    const before = confirmations;
    await page.click(`#conn-table button.disconnect[data-user="${user}"]`);
    return until(`the confirmation and the answer for ${user}`, async () => {
      const status = await page.textContent('#status');
      return (confirmations > before && status.includes(`of user ${user}`)) || { confirmations, status };
    });
  },
  async status(...words) {
    const text = words.join(' ');
    return until(`status "${text}"`, async () => {
      const status = await page.textContent('#status');
      return status.includes(text) || status;
    });
  },
  async 'key-in-url'() {
    const leaked = urls.filter((u) => u.includes(key));
    return leaked.length ? `fail the key appeared in ${leaked}` : `ok ${urls.length} requests`;
  },
  async screenshot() {
    await page.screenshot({ path: screenshot, fullPage: true });
    return 'ok';
  },
};

async function quit(code) {
  await browser.close().catch(() => {});
  rmSync(profile, { recursive: true, force: true });
  process.exit(code);
}

console.log('ready');
const lines = createInterface({ input: process.stdin });
for await (const line of lines) {
  const [name, ...args] = line.trim().split(/\s+/);
  if (!name) continue;
  if (name === 'quit') break;
  const command = commands[name];
  let answer;
  try {
    answer = command ? await command(...args) : `fail unknown command ${name}`;
  } catch (e) {
    answer = `fail ${name}: ${e.message.split('\n')[0]}`;
  }
  console.log(answer);
}
await quit(0);
