// Real-client test: the official Anthropic SDK (@anthropic-ai/sdk) against
// dsgate's Anthropic Messages path, as Claude Code uses it.
//
// DSGATE_ANTHROPIC_URL        dsgate's Anthropic base URL, e.g.
//                             http://127.0.0.1:PORT/anthropic (required): cache
//                             on, retries on (529 retried by default)
// DSGATE_ANTHROPIC_QUEUE_URL  the same for a dsgate whose one upstream takes one
//                             request at a time, with a queue of one and a short
//                             max_wait (queue full: 429; wait exceeded: 504)
// FAKE_URL                    the fake upstream behind both (its /_log counts
//                             upstream calls, its /_config arms a 529)
// DSGATE_ANTHROPIC_NOTE       why a URL above is missing (dsgate did not start)
//
// Prints `PASS name` / `FAIL name: reason` per test and a last line
// `RESULT passed=N failed=N` (tests/clients/run.py adds it up).

import Anthropic from '@anthropic-ai/sdk';
import { check, test, finish } from './runner.mjs';

const base = process.env.DSGATE_ANTHROPIC_URL;
const queueBase = process.env.DSGATE_ANTHROPIC_QUEUE_URL;
const fakeUrl = process.env.FAKE_URL;
const why = process.env.DSGATE_ANTHROPIC_NOTE || 'not set';

const API_KEY = 'sk-ant-client-test-not-a-real-key';

function sdk(baseURL, opts) {
  return new Anthropic({ baseURL, apiKey: API_KEY, maxRetries: 0, timeout: 20000, ...opts });
}

const client = base ? sdk(base) : null;
const queueClient = queueBase ? sdk(queueBase) : null;


function testId(p = 'node-anth') {
  return `${p}-${Date.now()}-${Math.random().toString(16).slice(2)}`;
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

async function fakeLog(id) {
  const log = await (await fetch(`${fakeUrl}/_log`)).json();
  return log.filter((e) => e.headers && e.headers['x-test-id'] === id);
}

async function waitFor(pred, ms, what) {
  const deadline = Date.now() + ms;
  for (;;) {
    const v = await pred();
    if (v) return v;
    if (Date.now() > deadline) throw new Error(`${what} not within ${ms} ms`);
    await sleep(20);
  }
}

function need(c, name) {
  check(c, `${name} not set: ${why}`);
  check(fakeUrl, 'FAKE_URL not set');
  return c;
}

// The error object of an APIError, checked to be Anthropic-shaped.
function anthropicShaped(err) {
  const body = err.error;
  check(body && body.type === 'error' && body.error && typeof body.error.type === 'string' &&
        body.error.type.length > 0 && typeof body.error.message === 'string',
  `error body is not Anthropic-shaped {"type":"error","error":{"type","message"}}: ${JSON.stringify(body)}`);
  return body.error;
}

const weatherTool = {
  name: 'get_weather',
  description: 'The weather in a city',
  input_schema: { type: 'object', properties: { query: { type: 'string' } }, required: ['query'] },
};

await test('anthropic_messages_create', async () => {
  const c = need(client, 'DSGATE_ANTHROPIC_URL');
  const text = `hello from the anthropic sdk ${testId()}`;
  const { data: m, response } = await c.messages.create({
    model: 'deepseek-chat',
    max_tokens: 256,
    messages: [{ role: 'user', content: text }],
  }).withResponse();
  check(response.status === 200, `status ${response.status}`);
  check(m.type === 'message' && m.role === 'assistant', `type ${m.type} role ${m.role}`);
  check(m.model === 'deepseek-chat', `model ${m.model}`);
  check(m.content.length === 1 && m.content[0].type === 'text', `content ${JSON.stringify(m.content)}`);
  check(m.content[0].text === `echo: ${text}`, `text ${JSON.stringify(m.content[0].text)}`);
  check(m.stop_reason === 'end_turn', `stop_reason ${m.stop_reason}`);
  check(m.usage && m.usage.input_tokens > 0 && m.usage.output_tokens > 0, `usage ${JSON.stringify(m.usage)}`);
});

await test('anthropic_messages_thinking', async () => {
  const c = need(client, 'DSGATE_ANTHROPIC_URL');
  const text = `think first ${testId()}`;
  const m = await c.messages.create({
    model: 'deepseek-chat',
    max_tokens: 2048,
    thinking: { type: 'enabled', budget_tokens: 1024 },
    messages: [{ role: 'user', content: text }],
  });
  check(m.content.length === 2, `content ${JSON.stringify(m.content)}`);
  check(m.content[0].type === 'thinking' && m.content[0].thinking === `thinking about: ${text}`,
    `thinking block ${JSON.stringify(m.content[0])}`);
  check(m.content[1].type === 'text' && m.content[1].text === `echo: ${text}`,
    `text block ${JSON.stringify(m.content[1])}`);
});

await test('anthropic_stream_tool_use_loop', async () => {
  const c = need(client, 'DSGATE_ANTHROPIC_URL');
  const ask = `please use tool get_weather for Paris ${testId()}`;
  const messages = [{ role: 'user', content: ask }];
  const s1 = c.messages.stream({ model: 'deepseek-chat', max_tokens: 256, tools: [weatherTool], messages });
  let jsonDeltas = 0;
  s1.on('inputJson', () => { jsonDeltas++; });
  const m1 = await s1.finalMessage();
  check(m1.stop_reason === 'tool_use', `stop_reason ${m1.stop_reason}`);
  const use = m1.content.find((b) => b.type === 'tool_use');
  check(use, `no tool_use block in ${JSON.stringify(m1.content)}`);
  check(use.name === 'get_weather', `tool name ${use.name}`);
  check(use.input && use.input.query === ask, `tool input ${JSON.stringify(use.input)}`);
  check(typeof use.id === 'string' && use.id.startsWith('toolu_'), `tool id ${use.id}`);
  check(jsonDeltas >= 1, 'no input_json_delta events');
  // the client runs the tool and answers with a tool_result
  const result = `sunny in Paris (${use.id})`;
  messages.push({ role: 'assistant', content: m1.content });
  messages.push({ role: 'user', content: [{ type: 'tool_result', tool_use_id: use.id, content: result }] });
  const s2 = c.messages.stream({ model: 'deepseek-chat', max_tokens: 256, tools: [weatherTool], messages });
  let text = '';
  s2.on('text', (t) => { text += t; });
  const m2 = await s2.finalMessage();
  check(m2.stop_reason === 'end_turn', `turn 2 stop_reason ${m2.stop_reason}`);
  check(m2.content[0].type === 'text' && m2.content[0].text === `echo: ${result}`,
    `turn 2 content ${JSON.stringify(m2.content)}`);
  check(text === m2.content[0].text, `text events ${JSON.stringify(text)}`);
});

await test('anthropic_529_absorbed_by_dsgate', async () => {
  const c = need(client, 'DSGATE_ANTHROPIC_URL');
  const id = testId();
  const r = await fetch(`${fakeUrl}/_config`, {
    method: 'POST', body: JSON.stringify({ fail_next: 1, fail_status: 529 }),
  });
  check(r.status === 200, `fake /_config ${r.status}`);
  try {
    const text = `survive a 529 ${id}`;
    let m;
    let response;
    try {
      ({ data: m, response } = await c.messages.create({
        model: 'deepseek-chat',
        max_tokens: 256,
        messages: [{ role: 'user', content: text }],
      }, { headers: { 'X-Test-Id': id } }).withResponse());
    } catch (e) {
      throw new Error(`the SDK (maxRetries 0) saw ${e.status} ${e.constructor.name}: dsgate did not retry the 529 (${e.message})`);
    }
    check(m.content[0].text === `echo: ${text}`, `content ${JSON.stringify(m.content)}`);
    const log = await fakeLog(id);
    check(log.length === 2 && log[0].status === 529 && log[1].status === 200,
      `fake saw ${JSON.stringify(log.map((e) => e.status))}, want [529,200]`);
    check(response.headers.get('x-dsgate-attempts') === '2',
      `X-Dsgate-Attempts ${response.headers.get('x-dsgate-attempts')}`);
  } finally {
    await fetch(`${fakeUrl}/_config`, { method: 'POST', body: JSON.stringify({ fail_next: 0 }) });
  }
});

// Every event of a stream (create with stream: true), and the response.
async function streamEvents(c, body, headers) {
  const { data: stream, response } = await c.messages.create({ ...body, stream: true },
    { headers }).withResponse();
  const events = [];
  for await (const ev of stream) events.push(ev);
  return { events, response };
}

await test('anthropic_stream_cached_replay', async () => {
  const c = need(client, 'DSGATE_ANTHROPIC_URL');
  const id = testId();
  const body = {
    model: 'deepseek-chat',
    max_tokens: 256,
    messages: [{ role: 'user', content: `cache this stream ${id}` }],
  };
  const a = await streamEvents(c, body, { 'X-Test-Id': id, 'X-Fake-Events': '6' });
  const b = await streamEvents(c, body, { 'X-Test-Id': id, 'X-Fake-Events': '6' });
  const types = a.events.map((e) => e.type);
  check(types[0] === 'message_start' && types[types.length - 1] === 'message_stop',
    `first stream's events ${JSON.stringify(types)}`);
  check(a.events.filter((e) => e.type === 'content_block_delta').length === 6,
    `text deltas ${JSON.stringify(types)}`);
  const log = await fakeLog(id);
  check(log.length === 1, `the fake saw ${log.length} calls, want 1 (the second from the cache; `
    + `X-Cache ${a.response.headers.get('x-cache')}, ${b.response.headers.get('x-cache')})`);
  check(b.response.headers.get('x-cache') === 'HIT', `second X-Cache ${b.response.headers.get('x-cache')}`);
  check(JSON.stringify(b.events) === JSON.stringify(a.events),
    `replayed events differ: ${JSON.stringify(b.events)} != ${JSON.stringify(a.events)}`);
  check((b.response.headers.get('content-type') || '').startsWith('text/event-stream'),
    `replay content-type ${b.response.headers.get('content-type')}`);
});

await test('anthropic_count_tokens', async () => {
  const c = need(client, 'DSGATE_ANTHROPIC_URL');
  const r = await c.messages.countTokens({
    model: 'deepseek-chat',
    messages: [{ role: 'user', content: 'count these tokens please' }],
  });
  check(Number.isInteger(r.input_tokens) && r.input_tokens > 0, `count_tokens ${JSON.stringify(r)}`);
});

// Occupies the queue dsgate's one upstream slot for MS ms; resolves once the
// fake has the request, to { done }: the pending fetch (wrapped, or the
// async function's result would wait for it).
async function occupy(ms) {
  const id = testId('node-anth-occupant');
  const p = fetch(`${queueBase}/v1/messages`, {
    method: 'POST',
    headers: { 'content-type': 'application/json', 'x-api-key': API_KEY, 'anthropic-version': '2023-06-01',
      'X-Fake-Delay-Ms': String(ms), 'X-Test-Id': id },
    body: JSON.stringify({ model: 'deepseek-chat', max_tokens: 16, messages: [{ role: 'user', content: id }] }),
  }).then((r) => r.text()).catch(() => null);
  await waitFor(async () => (await fakeLog(id)).length > 0, 3000, 'the occupying request at the fake');
  return { done: p };
}

async function queueDepth() {
  const u = new URL(queueBase);
  const text = await (await fetch(`${u.protocol}//${u.host}/metrics`)).text();
  let n = 0;
  for (const line of text.split('\n')) {
    const m = line.match(/^dsgate_queue_depth(\{[^}]*\})?\s+(\S+)/);
    if (m) n += Number(m[2]);
  }
  return n;
}

async function sdkError(promise) {
  try {
    await promise;
  } catch (e) {
    return e;
  }
  return null;
}

await test('anthropic_queue_full_429_is_RateLimitError', async () => {
  const c = need(queueClient, 'DSGATE_ANTHROPIC_QUEUE_URL');
  const occupant = await occupy(2500);
  const filler = fetch(`${queueBase}/v1/messages`, {
    method: 'POST',
    headers: { 'content-type': 'application/json', 'x-api-key': API_KEY, 'anthropic-version': '2023-06-01' },
    body: JSON.stringify({ model: 'deepseek-chat', max_tokens: 16, messages: [{ role: 'user', content: testId('filler') }] }),
  }).then((r) => r.text()).catch(() => null);
  try {
    await waitFor(async () => (await queueDepth()) >= 1, 3000, 'a queued request (dsgate_queue_depth)');
    const err = await sdkError(c.messages.create({
      model: 'deepseek-chat', max_tokens: 16, messages: [{ role: 'user', content: testId('rejected') }],
    }));
    check(err, 'no error: the request was not refused with the queue full');
    check(err instanceof Anthropic.RateLimitError, `not an Anthropic.RateLimitError: ${err.constructor.name} ${err.status} ${err.message}`);
    check(err.status === 429, `status ${err.status}`);
    const e = anthropicShaped(err);
    check(e.type === 'rate_limit_error', `error.type ${e.type}`);
    check(err.type === 'rate_limit_error', `the SDK's err.type ${err.type}`);
  } finally {
    await Promise.all([occupant.done, filler]);
  }
});

await test('anthropic_queue_wait_504_is_APIError', async () => {
  const c = need(queueClient, 'DSGATE_ANTHROPIC_QUEUE_URL');
  const occupant = await occupy(2500);
  try {
    const t0 = Date.now();
    const err = await sdkError(c.messages.create({
      model: 'deepseek-chat', max_tokens: 16, messages: [{ role: 'user', content: testId('waiter') }],
    }));
    check(err, 'no error: the request did not time out in the queue');
    check(err instanceof Anthropic.APIError && err.status === 504,
      `want an APIError with status 504, got ${err.constructor.name} ${err.status} ${err.message}`);
    check(err instanceof Anthropic.InternalServerError, `not an InternalServerError: ${err.constructor.name}`);
    check(Date.now() - t0 < 2400, `took ${Date.now() - t0} ms: not the queue's max_wait`);
    anthropicShaped(err);
    check(typeof err.type === 'string' && err.type.length > 0, `the SDK's err.type ${err.type}`);
  } finally {
    await occupant.done;
  }
});

await test('dsgate_still_healthy', async () => {
  const u = new URL(need(base, 'DSGATE_ANTHROPIC_URL'));
  const r = await fetch(`${u.protocol}//${u.host}/healthz`);
  check(r.status === 200, `healthz ${r.status}`);
});

finish();
