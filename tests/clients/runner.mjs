// runner.mjs: the little test runner the client tests share.  Each test
// prints `PASS name` or `FAIL name: why` (30 s limit); finish() prints
// `RESULT passed=N failed=N` (tests/clients/run.py adds it up) and exits.

let passed = 0;
let failed = 0;

export function check(cond, msg) {
  if (!cond) throw new Error(msg);
}

export async function test(name, fn) {
  const t0 = Date.now();
  const limit = 30000;
  let timer;
  try {
    await Promise.race([
      fn(),
      new Promise((_, reject) => {
        timer = setTimeout(() => reject(new Error(`timed out after ${limit} ms`)), limit);
      }),
    ]);
    passed++;
    console.log(`PASS ${name}` + (Date.now() - t0 >= 1000 ? ` (${((Date.now() - t0) / 1000).toFixed(2)}s)` : ''));
  } catch (e) {
    failed++;
    const why = (e && (e.stack || e.message)) || String(e);
    console.log(`FAIL ${name}: ${String(why).split('\n').slice(0, 3).join(' | ')}`);
  } finally {
    clearTimeout(timer);
  }
}

export function finish() {
  console.log(`RESULT passed=${passed} failed=${failed}`);
  process.exit(failed ? 1 : 0);
}
