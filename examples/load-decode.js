// The uplink script of tcpc-load's custom devices: each message is a line of JSON
// (the framing `delimiter` `\n` cuts it), returned as the device's telemetry.
function decode(bytes) {
  return JSON.parse(String.fromCharCode.apply(null, bytes));
}
