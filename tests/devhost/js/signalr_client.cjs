// Connects the unmodified @microsoft/signalr npm client (its Node build) to a devhost and
// prints one JSON line per event, so a Python test can drive and watch it.
//   node signalr_client.cjs <baseUrl> <userId> <target>[,<target>...]
// Lines: {"event":"connected","connectionId":...} | {"event":"message","target":...,"args":[...]}
//        {"event":"closed","error":...}          | {"event":"error","message":...}
// Reads "stop" on stdin to close cleanly.
const path = require("path");
const signalR = require(path.join(process.cwd(), "node_modules", "@microsoft", "signalr"));

const [baseUrl, userId, targets] = process.argv.slice(2);
const say = (obj) => process.stdout.write(JSON.stringify(obj) + "\n");

const connection = new signalR.HubConnectionBuilder()
  .withUrl(`${baseUrl}/api`, { headers: { "x-ms-signalr-userid": userId } })
  .configureLogging(signalR.LogLevel.Warning)
  .build();

for (const target of targets.split(",")) {
  connection.on(target, (...args) => say({ event: "message", target, args }));
}
connection.onclose((error) => say({ event: "closed", error: error ? String(error) : null }));

connection
  .start()
  .then(() => say({ event: "connected", connectionId: connection.connectionId }))
  .catch((error) => {
    say({ event: "error", message: String(error) });
    process.exit(1);
  });

process.stdin.setEncoding("utf8");
process.stdin.on("data", async (chunk) => {
  if (chunk.includes("stop")) {
    await connection.stop();
    process.exit(0);
  }
});
