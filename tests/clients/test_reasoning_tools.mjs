// Real-client test: a LangChain (@langchain/openai ChatOpenAI) tool-call loop
// against a thinking model (deepseek-reasoner) on the OpenAI chat path.
//
// LangChain keeps the answer's reasoning_content in additional_kwargs but does
// not send it back with the assistant message of turn 2, so DeepSeek answers
// 400 "Missing `reasoning_content` field ...".  dsgate with
// compat: {reasoning_content: restore} puts it back.
//
// FAKE_URL           the fake upstream (required): the loop straight against it
//                    shows that LangChain drops the field
// DSGATE_URL         a dsgate without compat (http://127.0.0.1:PORT/v1): the
//                    400 passes through
// DSGATE_COMPAT_URL  a dsgate with compat: {reasoning_content: restore}
// DSGATE_COMPAT_NOTE why DSGATE_COMPAT_URL is missing (dsgate did not start)
//
// Prints `PASS name` / `FAIL name: reason` per test and a last line
// `RESULT passed=N failed=N` (tests/clients/run.py adds it up).

import { ChatOpenAI } from '@langchain/openai';
import { HumanMessage } from '@langchain/core/messages';
import { tool } from '@langchain/core/tools';
import { z } from 'zod';
import { check, test, finish } from './runner.mjs';

const fakeUrl = process.env.FAKE_URL;
const plainUrl = process.env.DSGATE_URL;
const compatUrl = process.env.DSGATE_COMPAT_URL;
const compatWhy = process.env.DSGATE_COMPAT_NOTE || 'not set';


function testId() {
  return `node-lc-${Date.now()}-${Math.random().toString(16).slice(2)}`;
}

const lookup = tool(async ({ query }) => `looked up: ${query}`, {
  name: 'lookup',
  description: 'Looks something up',
  schema: z.object({ query: z.string() }),
});

function model(baseURL, id) {
  return new ChatOpenAI({
    model: 'deepseek-reasoner',
    apiKey: 'sk-langchain-test-not-a-real-key',
    maxRetries: 0,
    timeout: 20000,
    configuration: { baseURL, defaultHeaders: { 'X-Test-Id': id } },
  }).bindTools([lookup]);
}

// One answer: invoke(), or stream() with the chunks joined (the streaming
// API; invoke() with streaming: true would count tokens with tiktoken, which
// fetches its tables from the network).
async function answer(llm, messages, streaming) {
  if (!streaming) return llm.invoke(messages);
  let acc = null;
  for await (const chunk of await llm.stream(messages)) acc = acc ? acc.concat(chunk) : chunk;
  return acc;
}

// Turn 1 (tool call), the tool, turn 2.  Returns { turn1, turn2 | error }.
async function loop(baseURL, streaming, id) {
  const llm = model(baseURL, id);
  const ask = `please use tool lookup for the capital of France ${id}`;
  const messages = [new HumanMessage(ask)];
  const turn1 = await answer(llm, messages, streaming);
  check(turn1.tool_calls && turn1.tool_calls.length === 1, `turn 1 tool_calls ${JSON.stringify(turn1.tool_calls)}`);
  check(turn1.tool_calls[0].name === 'lookup' && turn1.tool_calls[0].args.query === ask,
    `turn 1 tool call ${JSON.stringify(turn1.tool_calls[0])}`);
  check(turn1.additional_kwargs.reasoning_content === `thinking about: ${ask}`,
    `turn 1 reasoning_content ${JSON.stringify(turn1.additional_kwargs.reasoning_content)}`);
  messages.push(turn1);
  for (const call of turn1.tool_calls) messages.push(await lookup.invoke(call));
  try {
    return { turn1, ask, turn2: await answer(llm, messages, streaming) };
  } catch (error) {
    return { turn1, ask, error };
  }
}

async function sentTurn2(id) {
  const log = await (await fetch(`${fakeUrl}/_log`)).json();
  const mine = log.filter((e) => e.headers && e.headers['x-test-id'] === id);
  check(mine.length >= 2, `the fake saw ${mine.length} requests`);
  return JSON.parse(mine[mine.length - 1].body);
}

for (const streaming of [false, true]) {
  const how = streaming ? 'stream' : 'nonstream';

  await test(`langchain_drops_reasoning_content_direct_400_${how}`, async () => {
    check(fakeUrl, 'FAKE_URL not set');
    const id = testId();
    const r = await loop(`${fakeUrl}/v1`, streaming, id);
    check(r.error, `turn 2 straight to the fake succeeded: LangChain kept reasoning_content (${JSON.stringify(r.turn2 && r.turn2.content)})`);
    check(r.error.status === 400, `turn 2 error status ${r.error.status}: ${r.error.message}`);
    check(/Missing `reasoning_content`/.test(r.error.message), `turn 2 error ${r.error.message}`);
    const sent = await sentTurn2(id);
    const asst = sent.messages.find((m) => m.role === 'assistant');
    check(asst && asst.tool_calls && !('reasoning_content' in asst),
      `LangChain's turn 2 assistant message ${JSON.stringify(asst)}`);
  });

  await test(`langchain_tool_loop_400_passes_through_without_compat_${how}`, async () => {
    check(plainUrl, 'DSGATE_URL not set');
    const r = await loop(plainUrl, streaming, testId());
    check(r.error && r.error.status === 400 && /Missing `reasoning_content`/.test(r.error.message),
      `turn 2 through dsgate without compat: ${r.error ? `${r.error.status} ${r.error.message}` : 'succeeded'}`);
  });

  await test(`langchain_tool_loop_restored_by_dsgate_${how}`, async () => {
    check(compatUrl, `DSGATE_COMPAT_URL ${compatWhy}`);
    const id = testId();
    const r = await loop(compatUrl, streaming, id);
    check(!r.error, `turn 2 through dsgate with compat restore failed: ${r.error && `${r.error.status} ${r.error.message}`}`);
    const want = `echo: looked up: ${r.ask}`;
    check(r.turn2.content === want, `turn 2 content ${JSON.stringify(r.turn2.content)}, want ${JSON.stringify(want)}`);
    const sent = await sentTurn2(id);
    const asst = sent.messages.find((m) => m.role === 'assistant');
    check(asst && asst.reasoning_content === `thinking about: ${r.ask}`,
      `the assistant message the fake got ${JSON.stringify(asst)}`);
  });
}

finish();
