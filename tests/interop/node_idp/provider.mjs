// An independent, certified OpenID provider (panva's oidc-provider) for guard's interop
// tests: tests/fix_node_idp.py starts it, tests/interop/ drive guard's CLI against it.
//
//   node provider.mjs --port 0 --users users.json [--id-token-ttl 65]
//                     [--ci-accounts ci.json --ci-client-id guard-ci]
//
// One public client `guard-cli` (no client secret) with the device authorization grant
// (RFC 8628) and refresh tokens that rotate on every use; a refresh token used twice
// revokes its whole grant (oidc-provider's own reuse handling). ID tokens are RS256 (a key
// made at start), short-lived (--id-token-ttl seconds) and carry preferred_username, name,
// email and groups (scope `groups`) from --users ({"alice": {"name", "email", "groups"}}).
// RFC 7009 revocation is on. State lives in memory: one process, one test session.
//
// Approval is headless: after the user code is confirmed at /device, oidc-provider sends
// the browser to /interaction/:uid; a POST there with `username=alice` signs alice in and
// grants every scope asked for, in one step (no login or consent page). Unknown users, and
// CI accounts at guard-cli or people at the CI client, get access_denied.
//
// It also plays a CI platform's token service (GitHub Actions-shaped claims) for guard's
// claim-binding tests, through the same machinery: --ci-accounts names CI "accounts"
// ({"ci-main": {"sub": "repo:octo/app:ref:refs/heads/main", "repository_id": "4242", ...}}),
// signed in like people (the device flow, approved as `ci-main`) but only for a second
// public client, --ci-client-id (device grant only, no refresh tokens), and people only
// for the first. Scope `ci` maps to every claim the CI accounts carry plus `jti`, a new
// one for each ID token (oidc-provider sets none: the account's claims() makes it, as a
// CI platform's tokens carry one for replay checks). The ID token's `sub` is the account's
// own (oidc-provider's accountId), its `aud` the CI client id; it lives 300 s.
//
// GET /interop/stats counts successful token requests by grant type and refused refreshes.
//
// Ready line on stdout: {"ready": true, "issuer": "http://127.0.0.1:PORT"}.

import { generateKeyPairSync, randomBytes, randomUUID } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { createServer } from 'node:http';
import { parseArgs } from 'node:util';

import Provider from 'oidc-provider';

const { values: args } = parseArgs({
  options: {
    host: { type: 'string', default: '127.0.0.1' },
    port: { type: 'string', default: '0' },
    users: { type: 'string' },
    'client-id': { type: 'string', default: 'guard-cli' },
    'id-token-ttl': { type: 'string', default: process.env.NODE_IDP_ID_TOKEN_TTL || '65' },
    'ci-accounts': { type: 'string' },
    'ci-client-id': { type: 'string', default: 'guard-ci' },
  },
});
if (!args.users) {
  console.error('provider.mjs: --users FILE is required');
  process.exit(2);
}
const users = JSON.parse(readFileSync(args.users, 'utf8'));
const idTokenTtl = Number.parseInt(args['id-token-ttl'], 10);
const DEVICE_GRANT = 'urn:ietf:params:oauth:grant-type:device_code';
const SCOPES = ['openid', 'profile', 'email', 'groups', 'offline_access'];
// CI accounts by sign-in name; each one's claims name its `sub` (its accountId).
const ciAccounts = args['ci-accounts'] ? JSON.parse(readFileSync(args['ci-accounts'], 'utf8')) : {};
const ciClientId = args['ci-client-id'];
const CI_TOKEN_TTL = 300;
const ciBySub = new Map(Object.entries(ciAccounts).map(([name, claims]) => [claims.sub, name]));
const ciClaimNames = [...new Set(Object.values(ciAccounts).flatMap((claims) => Object.keys(claims)))]
  .filter((claim) => claim !== 'sub');
for (const [name, claims] of Object.entries(ciAccounts)) {
  if (typeof claims.sub !== 'string' || !claims.sub || Object.hasOwn(users, claims.sub)
      || Object.hasOwn(ciAccounts, claims.sub)) {
    console.error(`provider.mjs: CI account ${name} needs its own sub`);
    process.exit(2);
  }
}

const { privateKey } = generateKeyPairSync('rsa', { modulusLength: 2048 });
const signingKey = { ...privateKey.export({ format: 'jwk' }), alg: 'RS256', use: 'sig', kid: 'interop-1' };

// A CI account, by its sign-in name or its accountId (`sub`).
function ciAccount(id) {
  const name = Object.hasOwn(ciAccounts, id) ? id : ciBySub.get(id);
  if (name === undefined) return undefined;
  const { sub, ...claims } = ciAccounts[name];
  return {
    accountId: sub,
    async claims() {
      // A new jti for every token: the broker accepts a CI token once.
      return { ...claims, sub, jti: randomUUID() };
    },
  };
}

function account(id) {
  if (!Object.hasOwn(users, id)) return ciAccount(id);
  const user = users[id];
  if (!user) return undefined;
  return {
    accountId: id,
    async claims() {
      return {
        sub: id,
        preferred_username: id,
        name: user.name ?? id,
        email: user.email,
        email_verified: Boolean(user.email),
        groups: user.groups ?? [],
      };
    },
  };
}

// The port is known once the server listens (--port 0: the kernel picks one), and the
// issuer names it: the provider is made then, and requests wait for it.
let provider;
let handler;
// Successful token requests by grant type, and refresh tokens refused: GET /interop/stats
// (a test counts the refreshes of eight concurrent guard commands).
const stats = { grants: {}, refreshRefused: 0 };

async function interaction(req, res, uid) {
  const details = await provider.interactionDetails(req, res);
  if (details.uid !== uid) {
    res.writeHead(400).end('interaction mismatch');
    return;
  }
  if (req.method === 'GET') {
    res.writeHead(200, { 'content-type': 'text/html; charset=utf-8' });
    res.end(`<form method="post"><input name="username"><button>sign in</button></form>
<!-- interaction ${details.prompt.name} -->`);
    return;
  }
  let body = '';
  for await (const chunk of req) body += chunk;
  const username = new URLSearchParams(body).get('username') ?? '';
  const { params } = details;
  // People sign in to guard-cli, CI accounts (by name) to the CI client only.
  const isCi = !Object.hasOwn(users, username) && Object.hasOwn(ciAccounts, username);
  const signedIn = Object.hasOwn(users, username) || isCi ? account(username) : undefined;
  if (!signedIn || isCi !== (params.client_id === ciClientId)) {
    await provider.interactionFinished(req, res, {
      error: 'access_denied',
      error_description: 'unknown user',
    }, { mergeWithLastSubmission: false });
    return;
  }
  const grant = new provider.Grant({ accountId: signedIn.accountId, clientId: params.client_id });
  grant.addOIDCScope(String(params.scope ?? SCOPES.join(' ')));
  const grantId = await grant.save();
  await provider.interactionFinished(req, res, {
    login: { accountId: signedIn.accountId },
    consent: { grantId },
  }, { mergeWithLastSubmission: false });
}

const server = createServer((req, res) => {
  if (req.method === 'GET' && req.url === '/interop/stats') {
    res.writeHead(200, { 'content-type': 'application/json' }).end(JSON.stringify(stats));
    return;
  }
  const match = /^\/interaction\/([^/?]+)/.exec(req.url ?? '');
  if (match) {
    interaction(req, res, match[1]).catch((err) => {
      console.error(`provider.mjs: interaction failed: ${err.name}: ${err.message}`);
      if (!res.headersSent) res.writeHead(400).end(err.message);
    });
    return;
  }
  handler(req, res);
});

server.listen(Number.parseInt(args.port, 10), args.host, () => {
  const { port } = server.address();
  const issuer = `http://${args.host}:${port}`;
  provider = new Provider(issuer, {
    clients: [{
      client_id: args['client-id'],
      token_endpoint_auth_method: 'none',
      grant_types: [DEVICE_GRANT, 'refresh_token'],
      response_types: [],
      redirect_uris: [],
      id_token_signed_response_alg: 'RS256',
    }, {
      // The CI client: a job's token service. Device grant only (no refresh tokens).
      client_id: ciClientId,
      token_endpoint_auth_method: 'none',
      grant_types: [DEVICE_GRANT],
      response_types: [],
      redirect_uris: [],
      id_token_signed_response_alg: 'RS256',
    }],
    jwks: { keys: [signingKey] },
    cookies: { keys: [randomBytes(32).toString('hex')] },
    scopes: [...SCOPES, 'ci'],
    claims: {
      openid: ['sub'],
      profile: ['preferred_username', 'name'],
      email: ['email', 'email_verified'],
      groups: ['groups'],
      ci: [...ciClaimNames, 'jti'],
    },
    // The ID token carries the scopes' claims (the broker reads groups from it), not only
    // the userinfo endpoint.
    conformIdTokenClaims: false,
    features: {
      devInteractions: { enabled: false },
      deviceFlow: { enabled: true },
      revocation: { enabled: true },
    },
    findAccount: (_ctx, id) => account(id),
    // Refresh tokens for offline_access (oidc-provider's default issueRefreshToken),
    // a new one at every use.
    rotateRefreshToken: true,
    ttl: {
      IdToken: (_ctx, _token, client) => (client?.clientId === ciClientId ? CI_TOKEN_TTL : idTokenTtl),
      AccessToken: 3600,
      DeviceCode: 600,
      Interaction: 600,
      Session: 3600,
      Grant: 86400,
      RefreshToken: 86400,
    },
    interactions: { url: (_ctx, interaction) => `/interaction/${interaction.uid}` },
    renderError(ctx, out) {
      ctx.type = 'json';
      ctx.body = out;
    },
  });
  provider.on('server_error', (_ctx, err) => {
    console.error(`provider.mjs: server_error: ${err.name}: ${err.message}`);
  });
  provider.on('grant.success', (ctx) => {
    const type = ctx.oidc.params.grant_type;
    stats.grants[type] = (stats.grants[type] ?? 0) + 1;
  });
  provider.on('grant.error', (ctx) => {
    if (ctx.oidc?.params?.grant_type === 'refresh_token') stats.refreshRefused += 1;
  });
  handler = provider.callback();
  console.log(JSON.stringify({ ready: true, issuer }));
});

for (const signal of ['SIGTERM', 'SIGINT']) {
  process.on(signal, () => server.close(() => process.exit(0)));
}
