// Script cost per message in node (V8), the peer of `cargo bench -p script-worker
// --bench scripts` (QuickJS): the same converters, read out of that bench's source so
// that both run the very same code, called 200,000 times each (BENCH_CALLS overrides)
// with the same arguments, a decode's result turned into JSON as the worker's engine
// walks it into JSON (an encode's string is its bytes). Run:
// node scripts/bench-scripts-node.js
"use strict";
const fs = require("fs");
const path = require("path");

const bench = fs.readFileSync(path.join(__dirname, "../script-worker/benches/scripts.rs"), "utf8");
// `const NAME: &str = r#"…"#;` in the Rust bench.
function script(name) {
  const found = new RegExp(`const ${name}: &str = r#"([\\s\\S]*?)"#;`).exec(bench);
  if (!found) throw new Error(`${name} is not in script-worker/benches/scripts.rs`);
  return found[1];
}
// Each script in a scope of its own, as the engine compiles each apart.
function compile(source, entry) {
  return new Function(`${source}\nreturn ${entry};`)();
}

const calls = Number(process.env.BENCH_CALLS || 200000);
const ctx = Object.freeze({ device_id: "d", device_number: "D001", kind: "uplink", topic: "" });
const json = (value) => JSON.stringify(value);
const text = (value) => value;
const cases = [
  ["empty decode", compile("function decode(b, ctx) { return null; }", "decode"), () => new Uint8Array([1, 2, 3, 4]), json],
  ["meter decode (4 fields)", compile(script("METER"), "decode"), () => new Uint8Array([0x01, 0x6d, 52, 97]), json],
  ["example custom decode", compile(script("EXAMPLE_CUSTOM"), "decode"), () => new Uint8Array(Buffer.from("365,520\n")), json],
  ["example downlink encode", compile(script("EXAMPLE_DOWNLINK"), "encode"), () => ({ method: "reboot", params: { delay: 5 } }), text],
];
for (const [name, fn, argument, out] of cases) {
  const output = out(fn(argument(), ctx)); // warm-up, and the result shown once
  let bytes = 0; // used, so that no call is optimised away
  const started = process.hrtime.bigint();
  for (let i = 0; i < calls; i++) {
    bytes += out(fn(argument(), ctx)).length;
  }
  const perCall = Number(process.hrtime.bigint() - started) / calls / 1000;
  console.log(`${name.padEnd(28)} ${perCall.toFixed(2).padStart(8)}µs per call   -> ${JSON.stringify(output)} (${bytes} bytes)`);
}
