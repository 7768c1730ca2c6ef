// The official JS SDK (@azure/service-bus 7.9.5) against `hybrid-worker emulator`.
// JS differs from Python on the wire (SASL skipped for SAS-signature strings, one session
// per link, str message-ids, drain after every receive, str-keyed dead-letter info), so it
// referees paths the Python suite does not reach.
const { test, before, after } = require("node:test");
const assert = require("node:assert");
const { spawn } = require("node:child_process");
const crypto = require("node:crypto");
const path = require("node:path");
const readline = require("node:readline");
const { ServiceBusClient } = require("@azure/service-bus");

const BIN =
  process.env.HYBRID_WORKER_BIN ||
  path.join(__dirname, "..", "..", "target", "debug", "hybrid-worker");
let proc;
let connStr;

before(async () => {
  proc = spawn(BIN, ["emulator", "--listen", "127.0.0.1:0", "--in-memory"], {
    stdio: ["ignore", "pipe", "inherit"],
  });
  const lines = readline.createInterface({ input: proc.stdout });
  connStr = await new Promise((resolve, reject) => {
    lines.once("line", resolve);
    proc.once("exit", (code) => reject(new Error(`emulator exited with ${code}`)));
  });
  assert.match(connStr, /^Endpoint=sb:\/\/127\.0\.0\.1:\d+;/);
});

after(() => proc && proc.kill("SIGTERM"));

test("send, abandon, defer, dead-letter", async () => {
  const client = new ServiceBusClient(connStr);
  try {
    const sender = client.createSender("jobs");
    await sender.sendMessages({ body: { hello: "js" }, applicationProperties: { k: "v" } });
    const receiver = client.createReceiver("jobs");
    let [m] = await receiver.receiveMessages(1, { maxWaitTimeInMs: 5000 });
    assert.deepStrictEqual(m.body, { hello: "js" });
    assert.strictEqual(m.deliveryCount, 0);
    assert.ok(m.messageId, "the broker assigns a message-id");
    await receiver.abandonMessage(m);
    [m] = await receiver.receiveMessages(1, { maxWaitTimeInMs: 5000 });
    assert.strictEqual(m.deliveryCount, 1);
    await receiver.deferMessage(m);
    const [d] = await receiver.receiveDeferredMessages([m.sequenceNumber]);
    await receiver.completeMessage(d);

    await sender.sendMessages({ body: "poison" });
    const [p] = await receiver.receiveMessages(1, { maxWaitTimeInMs: 5000 });
    await receiver.deadLetterMessage(p, { deadLetterReason: "R", deadLetterErrorDescription: "D" });
    const dlq = client.createReceiver("jobs", { subQueueType: "deadLetter" });
    const [x] = await dlq.receiveMessages(1, { maxWaitTimeInMs: 5000 });
    assert.strictEqual(x.deadLetterReason, "R");
    assert.strictEqual(x.deadLetterErrorDescription, "D");
    await dlq.completeMessage(x);
  } finally {
    await client.close();
  }
});

test("sessions: named, next available, state", async () => {
  const client = new ServiceBusClient(connStr);
  try {
    const sender = client.createSender("results");
    await sender.sendMessages({ body: "r1", sessionId: "job-1" });
    const named = await client.acceptSession("results", "job-1");
    const [r] = await named.receiveMessages(1, { maxWaitTimeInMs: 5000 });
    assert.strictEqual(r.body, "r1");
    await named.completeMessage(r);
    await named.setSessionState("st");
    assert.strictEqual(String(await named.getSessionState()), "st");
    await named.renewSessionLock();
    await named.close();
    await sender.sendMessages({ body: "r2", sessionId: "job-2" });
    const next = await client.acceptNextSession("results");
    assert.strictEqual(next.sessionId, "job-2");
    await next.close();
  } finally {
    await client.close();
  }
});

test("a SAS-signature connection string skips SASL", async () => {
  const endpoint = connStr.split(";")[0].slice("Endpoint=".length);
  const sr = encodeURIComponent(endpoint + "/");
  const se = Math.floor(Date.now() / 1000) + 3600;
  const sig = encodeURIComponent(
    crypto.createHmac("sha256", "SAS_KEY_VALUE").update(`${sr}\n${se}`).digest("base64"),
  );
  const token = `SharedAccessSignature sr=${sr}&sig=${sig}&se=${se}&skn=RootManageSharedAccessKey`;
  const client = new ServiceBusClient(
    `Endpoint=${endpoint};SharedAccessSignature=${token};UseDevelopmentEmulator=true`,
  );
  try {
    await client.createSender("jobs").sendMessages({ body: "via signature" });
    const r = client.createReceiver("jobs", { receiveMode: "receiveAndDelete" });
    const [m] = await r.receiveMessages(1, { maxWaitTimeInMs: 5000 });
    assert.strictEqual(m.body, "via signature");
  } finally {
    await client.close();
  }
});
