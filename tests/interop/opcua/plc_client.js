// A PLC stand-in for conveyor-vision's OPC UA server, on an independent stack (node-opcua).
//
// It connects like a PLC would (SignAndEncrypt, user name and password, the server's
// certificate trusted explicitly), subscribes to the PLC block and to ResultReadyEventType,
// takes each result the block shows (ResultValid true, a new Seq) by reading the block in
// one Read, acknowledges it by writing its Seq to ResultAck, and prints one JSON line per
// thing it saw:
//   {"type":"ready"}                                    subscribed
//   {"type":"result", "seq", "item_id", ..., "recv_ms", "ack"}   a result taken and acked
//   {"type":"event", "seq", "item_id", ..., "recv_ms"}   a ResultReadyEventType event
//   {"type":"churn", "connects", "failures"}            with --churn N, at the end
//                                (N clients: connected 2-8 s, away 1-4 s, again)
//   {"type":"done"}                                     stdin closed: disconnected
// It runs until its stdin closes. Options (all --name value):
//   --endpoint opc.tcp://127.0.0.1:4840/  --user U --password P
//   --cert client.der --key client.pem --app-uri urn:...  (the client's own certificate)
//   --server-cert server-cert.der --pki DIR   (DIR: a fresh folder for the trust store)
//   --namespace urn:conveyor-vision:vision    --interval 50 (publishing interval, ms)
//   --mode SignAndEncrypt|Sign|None           --churn N (N clients connecting and
//   disconnecting in a loop instead of the PLC)  --no-ack (never acknowledge)
"use strict";

const fs = require("fs");
const path = require("path");
const {
  OPCUAClient, MessageSecurityMode, SecurityPolicy, AttributeIds, DataType,
  TimestampsToReturn, UserTokenType, constructEventFilter, coerceNodeId,
} = require("node-opcua-client");
const { OPCUACertificateManager } = require("node-opcua-certificate-manager");

const FIELDS = ["Seq", "ItemId", "ProductId", "Decision", "FailSafe", "Late", "Reasons",
  "FusedScore", "DeadlineMs"];

function parseArgs(argv) {
  const opts = { interval: "50", mode: "SignAndEncrypt", namespace: "urn:conveyor-vision:vision" };
  for (let i = 0; i < argv.length; i++) {
    const key = argv[i].replace(/^--/, "");
    if (key === "no-ack") { opts.noAck = true; continue; }
    opts[key] = argv[++i];
  }
  return opts;
}

function emit(obj) {
  process.stdout.write(JSON.stringify(obj) + "\n");
}

function plain(value) {
  // Int64 comes as [high, low] in node-opcua: as a number (ms since the epoch fit a double).
  if (Array.isArray(value) && value.length === 2) return value[0] * 4294967296 + value[1];
  return value;
}

function record(names, values) {
  const out = {};
  names.forEach((name, i) => {
    const snake = name.replace(/([a-z])([A-Z])/g, "$1_$2").toLowerCase();
    out[snake] = plain(values[i]);
  });
  return out;
}

async function makeClient(opts, name, maxRetry) {
  const certificateManager = new OPCUACertificateManager({
    rootFolder: path.join(opts.pki, name), automaticallyAcceptUnknownCertificate: false,
    disableFileWatchers: true,
  });
  await certificateManager.initialize();
  if (opts["server-cert"]) {
    await certificateManager.trustCertificate(fs.readFileSync(opts["server-cert"]));
  }
  return OPCUAClient.create({
    applicationName: "conveyor-vision interop PLC",
    applicationUri: opts["app-uri"],
    certificateFile: opts.cert,
    privateKeyFile: opts.key,
    clientCertificateManager: certificateManager,
    securityMode: MessageSecurityMode[opts.mode],
    securityPolicy: opts.mode === "None" ? SecurityPolicy.None : SecurityPolicy.Basic256Sha256,
    endpointMustExist: false,
    connectionStrategy: { maxRetry, initialDelay: 200, maxDelay: 1000 },
    keepSessionAlive: true,
  });
}

async function openSession(opts, name, maxRetry = 3) {
  const client = await makeClient(opts, name, maxRetry);
  await client.connect(opts.endpoint);
  const identity = opts.user
    ? { type: UserTokenType.UserName, userName: opts.user, password: opts.password }
    : { type: UserTokenType.Anonymous };
  const session = await client.createSession(identity);
  const ns = (await session.readNamespaceArray()).indexOf(opts.namespace);
  if (ns < 0) throw new Error(`namespace ${opts.namespace} not on the server`);
  return { client, session, ns };
}

async function runPlc(opts, stopped) {
  const { client, session, ns } = await openSession(opts, "plc");
  const id = (s) => coerceNodeId(`ns=${ns};s=${s}`);
  const subscription = await session.createSubscription2({
    requestedPublishingInterval: Number(opts.interval), requestedLifetimeCount: 600,
    requestedMaxKeepAliveCount: 20, maxNotificationsPerPublish: 100, publishingEnabled: true,
    priority: 10,
  });
  let lastAcked = null;
  let busy = false;
  let again = false;
  async function take(recvMs) {
    if (busy) { again = true; return; }  // one take at a time; look again when it is done
    busy = true;
    try {
      do {
        again = false;
        const ids = [...FIELDS, "ResultValid"].map((f) => ({
          nodeId: id(`PLC.${f}`), attributeId: AttributeIds.Value }));
        const values = (await session.read(ids)).map((dv) => dv.value.value);
        const valid = values[FIELDS.length];
        const result = record(FIELDS, values);
        if (!valid || result.seq === lastAcked) continue;
        let ack = "none";
        if (!opts.noAck) {
          const status = await session.write({
            nodeId: id("PLC.ResultAck"), attributeId: AttributeIds.Value,
            value: { value: { dataType: DataType.UInt32, value: result.seq } } });
          ack = status.name;
        }
        lastAcked = result.seq;
        emit({ type: "result", ...result, recv_ms: recvMs, ack });
      } while (again);
    } catch (err) {
      emit({ type: "error", where: "take", error: String(err) });
    } finally {
      busy = false;
    }
  }
  for (const field of ["Seq", "ResultValid"]) {
    const item = await subscription.monitor(
      { nodeId: id(`PLC.${field}`), attributeId: AttributeIds.Value },
      { samplingInterval: 0, discardOldest: true, queueSize: 10 }, TimestampsToReturn.Both);
    item.on("changed", () => { take(Date.now()); });
  }
  const names = ["EventType", ...FIELDS.map((f) => `${ns}:${f}`)];
  const events = await subscription.monitor(
    { nodeId: id("VisionSystem"), attributeId: AttributeIds.EventNotifier },
    { samplingInterval: 0, discardOldest: false, queueSize: 1000,
      filter: constructEventFilter(names) }, TimestampsToReturn.Neither);
  events.on("changed", (fields) => {
    const values = fields.slice(1).map((v) => v.value);
    emit({ type: "event", ...record(FIELDS, values), recv_ms: Date.now() });
  });
  emit({ type: "ready" });
  await stopped;
  await subscription.terminate();
  await session.close();
  await client.disconnect();
}

async function runChurn(opts, stopped) {
  const counts = { connects: 0, failures: 0 };
  let stop = false;
  stopped.then(() => { stop = true; });
  // A pause that ends early when the run does.
  const pause = (ms) => Promise.race([new Promise((r) => setTimeout(r, ms)), stopped]);
  async function loop(n) {
    while (!stop) {
      try {
        const { client, session, ns } = await openSession(opts, `churn-${n}`, 0);
        const subscription = await session.createSubscription2({
          requestedPublishingInterval: 100, publishingEnabled: true });
        await subscription.monitor(
          { nodeId: coerceNodeId(`ns=${ns};s=PLC.Seq`), attributeId: AttributeIds.Value },
          { samplingInterval: 0, queueSize: 1 }, TimestampsToReturn.Neither);
        counts.connects++;
        await pause(2000 + Math.random() * 6000);  // connected
        await session.close();
        await client.disconnect();
        await pause(1000 + Math.random() * 3000);  // away
      } catch (err) {
        counts.failures++;  // e.g. closed at once by the server's connection rate limit
        await pause(1000 + Math.random() * 1000);
      }
    }
  }
  emit({ type: "ready" });
  await Promise.all(Array.from({ length: Number(opts.churn) }, (_, n) => loop(n)));
  emit({ type: "churn", ...counts });
}

async function main() {
  const opts = parseArgs(process.argv.slice(2));
  const stopped = new Promise((resolve) => {
    process.stdin.on("end", resolve);
    process.stdin.on("close", resolve);
    process.on("SIGTERM", resolve);
    process.stdin.resume();
  });
  try {
    await (opts.churn ? runChurn(opts, stopped) : runPlc(opts, stopped));
  } catch (err) {
    emit({ type: "error", where: "main", error: String(err) });
    process.exitCode = 1;
  }
  emit({ type: "done" });
  process.exit();
}

main();
