// Consume the Trigger Service's change events with nats.js (v2), as another service on the bus would.
//
//   node consume_events.mjs URL COUNT [TIMEOUT_SECONDS] [SUBJECT]
//
// Subscribes to SUBJECT (default `ms.trigger.events.>`) on the NATS server at URL and prints one
// JSON line `{"ready": true}` once the server has the subscription, then one JSON line per event
// (subject, kind, revision, account, trigger_type, name, and the stream sequence the events stream
// republished it with). Exits 0 after COUNT events, 2 when TIMEOUT_SECONDS (default 20) pass first.
import nats from "nats";

const { connect, JSONCodec } = nats;
const [url, count, timeoutArg, subjectArg] = process.argv.slice(2);
if (!url || !count) {
  console.error("usage: node consume_events.mjs URL COUNT [TIMEOUT_SECONDS] [SUBJECT]");
  process.exit(64);
}
const wanted = Number.parseInt(count, 10);
const timeoutMs = Number.parseFloat(timeoutArg ?? "20") * 1000;
const subject = subjectArg ?? "ms.trigger.events.>";
const codec = JSONCodec();

const nc = await connect({ servers: url, name: "consume-events-js" });
const timer = setTimeout(() => {
  console.error(`timed out after ${timeoutMs} ms waiting for ${wanted} events on ${subject}`);
  process.exit(2);
}, timeoutMs);

const sub = nc.subscribe(subject, { max: wanted });
await nc.flush(); // the server has the subscription: the test may make its changes now
console.log(JSON.stringify({ ready: true }));

for await (const msg of sub) {
  const event = codec.decode(msg.data);
  console.log(
    JSON.stringify({
      subject: msg.subject,
      kind: event.kind,
      revision: event.revision,
      account: event.account,
      trigger_type: event.trigger_type,
      name: event.name,
      seq: Number(msg.headers?.get("Nats-Sequence") ?? 0),
    }),
  );
}
clearTimeout(timer);
await nc.close();
