// Verifies a wxbroker access token with jose against the broker's JWKS, as any service would:
//   node verify.mjs JWKS_URL TOKEN ISSUER AUDIENCE [UNIX_SECONDS]
// Prints one JSON line: {"ok": true, "payload": ..., "header": ...} or {"ok": false, "code": ...}.
// UNIX_SECONDS sets jose's clock (the tests' broker runs on a clock of its own).
import { createRemoteJWKSet, jwtVerify } from 'jose';

const [jwksUrl, token, issuer, audience, at] = process.argv.slice(2);
const jwks = createRemoteJWKSet(new URL(jwksUrl));
try {
  const { payload, protectedHeader } = await jwtVerify(token, jwks, {
    issuer,
    audience,
    algorithms: ['EdDSA'],
    ...(at ? { currentDate: new Date(Number(at) * 1000) } : {}),
  });
  console.log(JSON.stringify({ ok: true, payload, header: protectedHeader }));
} catch (error) {
  console.log(JSON.stringify({ ok: false, code: error.code ?? null, message: error.message }));
}
