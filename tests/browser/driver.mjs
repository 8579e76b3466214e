// Drive one real browser for tests/test_browser.py, which decides what to do
// and checks what happened; this script only carries out its commands.
//
//   node driver.mjs chromium|firefox EXECUTABLE PROFILE_DIR
//
// Reads one JSON command per line on stdin and answers each with one JSON line
// on stdout: {"id": N, "ok": true, "result": ...} or {"id": N, "ok": false,
// "error": "..."}. The first line it prints is {"ready": true, "version": ...}.
//
// Chromium is launched by puppeteer-core with an explicit argument list (none
// of puppeteer's defaults). Firefox is started here with the prepared profile
// and puppeteer-core connects to it over WebDriver BiDi: puppeteer's own
// Firefox launcher would rewrite the profile's user.js with its automation
// preferences, and the test wants Firefox's defaults plus one preference.

import {spawn} from 'node:child_process';
import readline from 'node:readline';

import puppeteer from 'puppeteer-core';

const [browserName, executablePath, profileDir] = process.argv.slice(2);
if (!['chromium', 'firefox'].includes(browserName) || !executablePath || !profileDir) {
  process.stderr.write('usage: node driver.mjs chromium|firefox EXECUTABLE PROFILE_DIR\n');
  process.exit(2);
}

const VIEWPORT = {width: 960, height: 720};
const STEP_TIMEOUT = 30_000;

const CHROMIUM_ARGS = [
  '--headless=new',
  '--no-sandbox', // the tests run as root, where Chromium's sandbox cannot start
  '--disable-gpu',
  '--no-first-run',
  '--disable-background-networking',
  '--disable-component-update',
  '--disable-sync',
];

let firefoxProcess = null;

async function launchChromium() {
  return puppeteer.launch({
    executablePath,
    ignoreDefaultArgs: true,
    args: [...CHROMIUM_ARGS, `--user-data-dir=${profileDir}`, 'about:blank'],
    defaultViewport: VIEWPORT,
    timeout: 60_000,
    protocolTimeout: 60_000,
  });
}

function firefoxEndpoint(child) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error('Firefox did not open WebDriver BiDi within 60 s')), 60_000);
    const lines = readline.createInterface({input: child.stderr});
    const seen = [];
    lines.on('line', (line) => {
      const match = /^WebDriver BiDi listening on (ws:\/\/\S+)/.exec(line);
      if (match) {
        clearTimeout(timer);
        resolve(match[1]);
      } else if (seen.length < 50) {
        seen.push(line);
      }
    });
    child.on('exit', (code, signal) => {
      clearTimeout(timer);
      reject(new Error(`Firefox exited (${code ?? signal}) before WebDriver BiDi was up:\n${seen.join('\n')}`));
    });
  });
}

async function launchFirefox() {
  firefoxProcess = spawn(
    executablePath,
    ['--headless', '--no-remote', '--profile', profileDir, '--remote-debugging-port=0', 'about:blank'],
    {stdio: ['ignore', 'ignore', 'pipe'], env: {...process.env, MOZ_CRASHREPORTER_DISABLE: '1'}},
  );
  const endpoint = await firefoxEndpoint(firefoxProcess);
  return puppeteer.connect({
    browserWSEndpoint: `${endpoint}/session`,
    protocol: 'webDriverBiDi',
    defaultViewport: VIEWPORT,
    protocolTimeout: 60_000,
  });
}

const browser = browserName === 'chromium' ? await launchChromium() : await launchFirefox();
const page = await browser.newPage();
page.setDefaultTimeout(STEP_TIMEOUT);
page.setDefaultNavigationTimeout(STEP_TIMEOUT);

async function open(url) {
  const response = await page.goto(url, {waitUntil: 'load'});
  if (!response || !response.ok()) {
    throw new Error(`loading ${url} gave ${response ? response.status() : 'no answer'}`);
  }
}

const commands = {
  // Load a caller page and let it call the issuer; the page defines callIssuer().
  async fetch({page: pageUrl, url, variant, audience}) {
    await open(pageUrl);
    return page.evaluate(
      (url, variant, audience) => window.callIssuer(url, variant, audience),
      url,
      variant,
      audience,
    );
  },
  // Load the diagnostic page, wait for its verdict, take a screenshot.
  async demo({url, screenshot}) {
    await open(url);
    await page.waitForFunction(
      () => {
        const result = document.getElementById('result');
        return result && result.dataset.outcome && result.dataset.outcome !== 'pending';
      },
      {timeout: STEP_TIMEOUT},
    );
    // Let the countdown tick once so the screenshot shows it running.
    await new Promise((resolve) => setTimeout(resolve, 1100));
    const state = await page.evaluate(() => {
      const result = document.getElementById('result');
      return {
        outcome: result.dataset.outcome,
        text: result.innerText,
        pageText: document.body.innerText,
        origin: window.location.origin,
        issuer: document.getElementById('issuer').value,
        audience: document.getElementById('audience').value,
      };
    });
    if (screenshot) {
      await page.screenshot({path: screenshot, fullPage: true});
    }
    return state;
  },
  async version() {
    return browser.version();
  },
};

async function shutdown() {
  try {
    await browser.close();
  } catch (error) {
    process.stderr.write(`closing the browser: ${error}\n`);
  }
  if (firefoxProcess && firefoxProcess.exitCode === null && firefoxProcess.signalCode === null) {
    const exited = new Promise((resolve) => firefoxProcess.once('exit', resolve));
    const timer = setTimeout(() => firefoxProcess.kill('SIGKILL'), 10_000);
    await exited;
    clearTimeout(timer);
  }
}

function reply(message) {
  process.stdout.write(JSON.stringify(message) + '\n');
}

reply({ready: true, browser: browserName, version: await browser.version()});

const input = readline.createInterface({input: process.stdin});
for await (const line of input) {
  if (!line.trim()) continue;
  let command;
  try {
    command = JSON.parse(line);
  } catch (error) {
    reply({id: null, ok: false, error: `not JSON: ${error}`});
    continue;
  }
  if (command.cmd === 'quit') {
    break;
  }
  const handler = commands[command.cmd];
  if (!handler) {
    reply({id: command.id, ok: false, error: `unknown command ${command.cmd}`});
    continue;
  }
  try {
    reply({id: command.id, ok: true, result: await handler(command)});
  } catch (error) {
    reply({id: command.id, ok: false, error: String(error && error.stack ? error.stack : error)});
  }
}
// A quit command, or the end of stdin (the test went away): close the browser either way.
await shutdown();
reply({ok: true, closed: true});
process.exit(0);
