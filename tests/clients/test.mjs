// Real-client test: the official openai npm package against dsgate.
//
// DSGATE_URL  dsgate's base URL, e.g. http://127.0.0.1:PORT/v1 (required)
// FAKE_URL    the fake upstream behind it, e.g. http://127.0.0.1:PORT (for
//             comparing the models list and reading its /_log)
//
// Prints `PASS name` / `FAIL name: reason` per test and a last line
// `RESULT passed=N failed=N` (tests/clients/run.py adds it up).

import OpenAI, { APIError, BadRequestError } from 'openai';
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
  apiKey: 'sk-client-test-not-a-real-key',
  maxRetries: 0,
  timeout: 20000,
});


async function nonStream(model, content) {
  return client.chat.completions.create({
    model,
    messages: [{ role: 'user', content }],
  });
}

async function streamed(model, content, opts) {
  const stream = await client.chat.completions.create({
    model,
    messages: [{ role: 'user', content }],
    stream: true,
  }, opts);
  let text = '';
  let reasoning = '';
  let chunks = 0;
  let finish = null;
  const ids = new Set();
  for await (const chunk of stream) {
    chunks++;
    ids.add(chunk.id);
    const choice = chunk.choices && chunk.choices[0];
    if (!choice) continue;
    const d = choice.delta || {};
    if (typeof d.content === 'string') text += d.content;
    if (typeof d.reasoning_content === 'string') reasoning += d.reasoning_content;
    if (choice.finish_reason) finish = choice.finish_reason;
  }
  return { text, reasoning, chunks, finish, ids };
}

await test('chat_completion', async () => {
  const r = await nonStream('deepseek-chat', 'hello from the openai sdk');
  check(r.object === 'chat.completion', `object ${r.object}`);
  check(r.choices[0].message.content === 'echo: hello from the openai sdk',
    `content ${JSON.stringify(r.choices[0].message.content)}`);
  check(r.model === 'deepseek-chat', `model ${r.model}`);
  check(r.usage && r.usage.total_tokens > 0, 'no usage');
});

await test('chat_completion_with_response_headers', async () => {
  const { data, response } = await client.chat.completions.create({
    model: 'deepseek-chat',
    messages: [{ role: 'user', content: 'raw response' }],
  }).withResponse();
  check(response.status === 200, `status ${response.status}`);
  check(data.choices[0].message.content === 'echo: raw response', 'content');
});

for (const model of ['deepseek-chat', 'deepseek-reasoner']) {
  await test(`stream_equals_nonstream_${model}`, async () => {
    const msg = `stream through dsgate with ${model}, please`;
    const n = await nonStream(model, msg);
    const want = n.choices[0].message;
    const s = await streamed(model, msg);
    check(s.chunks >= 3, `only ${s.chunks} chunks`);
    check(s.ids.size === 1, `chunk ids ${[...s.ids]}`);
    check(s.finish === 'stop', `finish_reason ${s.finish}`);
    check(s.text === want.content,
      `content ${JSON.stringify(s.text)} != ${JSON.stringify(want.content)}`);
    if (model.includes('reasoner')) {
      check(typeof want.reasoning_content === 'string' && want.reasoning_content.length > 0,
        'no reasoning_content in the non-stream answer');
      check(s.reasoning === want.reasoning_content,
        `reasoning ${JSON.stringify(s.reasoning)} != ${JSON.stringify(want.reasoning_content)}`);
    } else {
      check(s.reasoning === '', 'reasoning deltas for a chat model');
    }
  });
}

await test('models_list', async () => {
  const ids = [];
  for await (const m of client.models.list()) ids.push(m.id);
  check(ids.includes('deepseek-chat') && ids.includes('deepseek-reasoner'),
    `models ${JSON.stringify(ids)}`);
  if (fakeUrl) {
    const direct = await (await fetch(`${fakeUrl}/v1/models`)).json();
    const want = direct.data.map((m) => m.id);
    check(JSON.stringify(ids) === JSON.stringify(want),
      `models ${JSON.stringify(ids)} != fake's ${JSON.stringify(want)}`);
  }
});

await test('upstream_400_is_APIError', async () => {
  let err = null;
  try {
    await client.chat.completions.create({
      model: 'deepseek-chat',
      messages: [{ role: 'user', content: 'please fail' }],
    }, { headers: { 'X-Fake-Status': '400' } });
  } catch (e) {
    err = e;
  }
  check(err !== null, 'no error thrown');
  check(err instanceof APIError, `not an APIError: ${err && err.constructor && err.constructor.name}`);
  check(err instanceof BadRequestError, `not a BadRequestError: ${err.constructor.name}`);
  check(err.status === 400, `status ${err.status}`);
  check(typeof err.message === 'string' && err.message.length > 0, 'no message');
});

await test('upstream_400_streamed_is_APIError', async () => {
  let err = null;
  try {
    await streamed('deepseek-chat', 'please fail', { headers: { 'X-Fake-Status': '400' } });
  } catch (e) {
    err = e;
  }
  check(err instanceof APIError && err.status === 400,
    `got ${err && err.constructor && err.constructor.name} status ${err && err.status}`);
});

await test('stream_abort_closes_upstream', async () => {
  check(fakeUrl, 'FAKE_URL not set');
  const testId = `node-abort-${Date.now()}-${Math.random().toString(16).slice(2)}`;
  const stream = await client.chat.completions.create({
    model: 'deepseek-chat',
    messages: [{ role: 'user', content: 'a long answer that the client abandons' }],
    stream: true,
  }, { headers: { 'X-Fake-Events': '400', 'X-Fake-Event-Delay-Ms': '20', 'X-Test-Id': testId } });
  let n = 0;
  for await (const chunk of stream) {
    if (chunk && ++n >= 3) break;             // leaving the loop aborts the request
  }
  stream.controller.abort();
  const deadline = Date.now() + 3000;
  let entry = null;
  while (Date.now() < deadline) {
    const log = await (await fetch(`${fakeUrl}/_log`)).json();
    entry = log.find((e) => e.headers && e.headers['x-test-id'] === testId);
    if (entry && entry.client_closed) break;
    await new Promise((r) => setTimeout(r, 20));
  }
  check(entry, 'request not in the fake\'s log');
  check(entry.client_closed, 'the fake did not see the upstream connection close within 3 s');
});

await test('dsgate_still_healthy', async () => {
  const u = new URL(base);
  const r = await fetch(`${u.protocol}//${u.host}/healthz`);
  check(r.status === 200, `healthz ${r.status}`);
});

finish();
