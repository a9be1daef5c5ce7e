#!/usr/bin/env node
// s3emu.js — runs the S3 emulator used by the tests, in the foreground:
//
//   node scripts/s3emu.js --port P --dir D --bucket B [--address A] [--verbose]
//
// The emulator is @20minutes/s3rver@5.0.0, installed by scripts/deps.sh into
// third_party/s3emu/node_modules (the package has no command-line entry of
// its own). It verifies AWS Signature V4 (Authorization header and presigned
// query), refuses unknown access keys and expired presigned URLs; it does not
// check the payload hash nor clock skew of presigned requests, and lets
// anonymous requests through. Credentials: S3RVER / S3RVER.
//
// Prints one line "s3emu listening on http://A:P bucket B" once the port
// accepts, then serves until SIGTERM/SIGINT (exit 0).
'use strict';

const path = require('node:path');

function usage(msg) {
  if (msg) process.stderr.write(`s3emu: ${msg}\n`);
  process.stderr.write('usage: node scripts/s3emu.js --port P --dir D --bucket B [--address A] [--verbose]\n');
  process.exit(2);
}

function parseArgs(argv) {
  const opt = { address: '127.0.0.1', port: null, dir: null, bucket: null, verbose: false };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    const val = () => {
      if (i + 1 >= argv.length) usage(`${a} needs a value`);
      return argv[++i];
    };
    if (a === '--port') opt.port = Number(val());
    else if (a === '--dir') opt.dir = val();
    else if (a === '--bucket') opt.bucket = val();
    else if (a === '--address') opt.address = val();
    else if (a === '--verbose') opt.verbose = true;
    else if (a === '-h' || a === '--help') usage();
    else usage(`unknown argument ${a}`);
  }
  if (!Number.isInteger(opt.port) || opt.port < 0 || opt.port > 65535) usage('--port must be 0..65535');
  if (!opt.dir) usage('--dir is required');
  if (!opt.bucket || !/^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$/.test(opt.bucket)) usage('--bucket must be a valid bucket name');
  return opt;
}

function loadS3rver() {
  const root = path.resolve(__dirname, '..', 'third_party', 's3emu', 'node_modules');
  try {
    return require(require.resolve('@20minutes/s3rver', { paths: [root] }));
  } catch (e) {
    process.stderr.write(`s3emu: cannot load @20minutes/s3rver from ${root} (run scripts/deps.sh): ${e.message}\n`);
    process.exit(3);
  }
}

async function main() {
  const opt = parseArgs(process.argv.slice(2));
  const S3rver = loadS3rver();
  const server = new S3rver({
    address: opt.address,
    port: opt.port,
    directory: path.resolve(opt.dir),
    silent: !opt.verbose,
    configureBuckets: [{ name: opt.bucket }],
  });
  const addr = await server.run();
  process.stdout.write(`s3emu listening on http://${addr.address}:${addr.port} bucket ${opt.bucket}\n`);
  let stopping = false;
  const stop = async () => {
    if (stopping) return;
    stopping = true;
    // Keep-alive connections would hold close() open: give them a moment.
    setTimeout(() => process.exit(0), 2000).unref();
    try {
      if (server.httpServer && server.httpServer.closeAllConnections) server.httpServer.closeAllConnections();
      await server.close();
    } finally {
      process.exit(0);
    }
  };
  process.on('SIGTERM', stop);
  process.on('SIGINT', stop);
}

main().catch((e) => {
  process.stderr.write(`s3emu: ${e && e.stack ? e.stack : e}\n`);
  process.exit(1);
});
