// Real-client test of the response cache: the official openai npm package
// against a dsgate with the cache on (tests/clients/run.py starts it).
//
// DSGATE_URL  dsgate's base URL, e.g. http://127.0.0.1:PORT/v1 (required)
// FAKE_URL    the fake upstream behind it (its /_log counts upstream calls)
//
// A streamed chat completion twice: the second is an X-Cache HIT replayed
// as SSE that the SDK consumes, with the same content, chunks and id.
// Prints `PASS name` / `FAIL name: reason` per test and a last line
// `RESULT passed=N failed=N`.

import OpenAI from 'openai';
import { check, test, finish } from './runner.mjs';

const base = process.env.DSGATE_URL;
const fakeUrl = process.env.FAKE_URL;
if (!base) {
  console.log('FAIL setup: DSGATE_URL is not set');
  console.log('RESULT passed=0 failed=1');
  process.exit(1);
}

const client = new OpenAI({
  baseURL: base,
  apiKey: 'sk-client-cache-test-not-a-real-key',
  maxRetries: 0,
  timeout: 20000,
});


function testId() {
  return `node-cache-${Date.now()}-${Math.random().toString(16).slice(2)}`;
}

async function upstreamCalls(id) {
  const log = await (await fetch(`${fakeUrl}/_log`)).json();
  return log.filter((e) => e.headers && e.headers['x-test-id'] === id);
}

// One streamed completion: the reassembled answer and the response headers.
async function streamed(model, content, id) {
  const { data: stream, response } = await client.chat.completions.create({
    model,
    messages: [{ role: 'user', content }],
    stream: true,
  }, { headers: { 'X-Test-Id': id } }).withResponse();
  const out = {
    status: response.status,
    xcache: response.headers.get('x-cache'),
    attempts: response.headers.get('x-dsgate-attempts'),
    ctype: response.headers.get('content-type'),
    text: '',
    reasoning: '',
    chunks: [],
    finish: null,
  };
  for await (const chunk of stream) {
    out.chunks.push(chunk);
    const choice = chunk.choices && chunk.choices[0];
    if (!choice) continue;
    const d = choice.delta || {};
    if (typeof d.content === 'string') out.text += d.content;
    if (typeof d.reasoning_content === 'string') out.reasoning += d.reasoning_content;
    if (choice.finish_reason) out.finish = choice.finish_reason;
  }
  return out;
}

for (const model of ['deepseek-chat', 'deepseek-reasoner']) {
  await test(`stream_cache_hit_replays_${model}`, async () => {
    const id = testId();
    const content = `cache me through the sdk (${id})`;
    const a = await streamed(model, content, id);
    check(a.status === 200, `first: status ${a.status}`);
    check(a.xcache === 'MISS', `first: X-Cache ${a.xcache}`);
    check(a.text === `echo: ${content}`, `first: content ${JSON.stringify(a.text)}`);
    const b = await streamed(model, content, id);
    check(b.status === 200, `second: status ${b.status}`);
    check(b.xcache === 'HIT', `second: X-Cache ${b.xcache}`);
    check(b.attempts === '0', `second: X-Dsgate-Attempts ${b.attempts}`);
    check(b.ctype && b.ctype.startsWith('text/event-stream'), `second: content-type ${b.ctype}`);
    check(b.text === a.text, `replayed content ${JSON.stringify(b.text)} != ${JSON.stringify(a.text)}`);
    check(b.reasoning === a.reasoning, 'replayed reasoning differs');
    if (model.includes('reasoner')) check(b.reasoning.length > 0, 'no reasoning_content replayed');
    check(b.finish === 'stop', `second: finish_reason ${b.finish}`);
    check(b.chunks.length === a.chunks.length, `chunks ${b.chunks.length} != ${a.chunks.length}`);
    check(JSON.stringify(b.chunks) === JSON.stringify(a.chunks), 'replayed chunks differ');
    check(new Set(b.chunks.map((c) => c.id)).size === 1 && b.chunks[0].id === a.chunks[0].id,
      'replayed chunk ids differ');
    if (fakeUrl) {
      const calls = await upstreamCalls(id);
      check(calls.length === 1, `upstream saw ${calls.length} calls`);
      console.log(`# the SDK sent accept-encoding: ${JSON.stringify(calls[0].headers['accept-encoding'] || null)}`);
    }
  });
}

await test('nonstream_cache_hit_through_sdk', async () => {
  const id = testId();
  const req = { model: 'deepseek-chat', messages: [{ role: 'user', content: `plain ${id}` }] };
  const a = await client.chat.completions.create(req, { headers: { 'X-Test-Id': id } }).withResponse();
  const b = await client.chat.completions.create(req, { headers: { 'X-Test-Id': id } }).withResponse();
  check(a.response.headers.get('x-cache') === 'MISS', `first: X-Cache ${a.response.headers.get('x-cache')}`);
  check(b.response.headers.get('x-cache') === 'HIT', `second: X-Cache ${b.response.headers.get('x-cache')}`);
  check(JSON.stringify(a.data) === JSON.stringify(b.data), 'hit differs from the first answer');
  if (fakeUrl) {
    const calls = await upstreamCalls(id);
    check(calls.length === 1, `upstream saw ${calls.length} calls`);
  }
});

await test('no_store_bypass_through_sdk', async () => {
  const id = testId();
  const req = { model: 'deepseek-chat', messages: [{ role: 'user', content: `private ${id}` }] };
  const opts = { headers: { 'X-Test-Id': id, 'Cache-Control': 'no-store' } };
  const a = await client.chat.completions.create(req, opts).withResponse();
  const b = await client.chat.completions.create(req, opts).withResponse();
  check(a.response.headers.get('x-cache') === 'BYPASS', `X-Cache ${a.response.headers.get('x-cache')}`);
  check(b.response.headers.get('x-cache') === 'BYPASS', `X-Cache ${b.response.headers.get('x-cache')}`);
  check(a.data.id !== b.data.id, 'no-store answers share an id');
});

finish();
