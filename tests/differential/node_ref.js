// tests/differential/node_ref.js: Node's HTTP/1.1 parser (llhttp, through
// node:http with its default options) as a reference for
// tests/integration/test_differential.py.
//
// Listens on 127.0.0.1 (a free port), prints `READY <port>` once it accepts.
// Every request that Node's parser accepts and reads to its end is answered
// 200 with an empty body and the header X-Ref: the JSON {"method", "url",
// "body"} (body: the body bytes as Node delivered them, base64), itself in
// base64 (a header, so that answers to HEAD carry it too): the client sees
// on its own socket what Node made of the bytes it sent.
//
// What the parser refuses gets 400 (431 for HPE_HEADER_OVERFLOW) with
// `Connection: close` and the llhttp error code in X-Error, as Node's own
// default answer would, with one difference: Node's default 'clientError'
// handling destroys the socket at once, which also throws away the answer
// to a request that was parsed in full just before the bad bytes (say,
// data after `Connection: close`); here the 400 goes out 50 ms later,
// after that answer.  Runs until SIGTERM or its stdin closes.
'use strict';

const http = require('node:http');

const server = http.createServer((req, res) => {
  const parts = [];
  req.on('data', (d) => parts.push(d));
  req.on('end', () => {
    const ref = JSON.stringify({
      method: req.method,
      url: req.url,
      body: Buffer.concat(parts).toString('base64'),
    });
    res.writeHead(200, {
      'X-Ref': Buffer.from(ref).toString('base64'),
      'Content-Length': 0,
    });
    res.end();
  });
});

server.on('clientError', (err, socket) => {
  setTimeout(() => {
    if (!socket.writable) {
      socket.destroy();
      return;
    }
    const status = err.code === 'HPE_HEADER_OVERFLOW' ? '431 Request Header Fields Too Large'
                                                      : '400 Bad Request';
    socket.end(`HTTP/1.1 ${status}\r\nConnection: close\r\nX-Error: ${err.code}\r\n\r\n`);
  }, 50);
});

server.listen(0, '127.0.0.1', () => {
  process.stdout.write(`READY ${server.address().port}\n`);
});

const stop = () => {
  server.close(() => process.exit(0));
  setTimeout(() => process.exit(0), 200);
};
process.on('SIGTERM', stop);
process.on('SIGINT', stop);
process.stdin.on('end', stop);
process.stdin.resume();
