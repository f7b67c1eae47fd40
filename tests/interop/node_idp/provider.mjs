// An independent, certified OpenID provider (panva's oidc-provider) for guard's interop
// tests: tests/fix_node_idp.py starts it, tests/interop/ drive guard's CLI against it.
//
//   node provider.mjs --port 0 --users users.json [--id-token-ttl 65]
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
// grants every scope asked for, in one step (no login or consent page). Unknown users get
// access_denied.
//
// GET /interop/stats counts successful token requests by grant type and refused refreshes.
//
// Ready line on stdout: {"ready": true, "issuer": "http://127.0.0.1:PORT"}.

import { generateKeyPairSync, randomBytes } from 'node:crypto';
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

const { privateKey } = generateKeyPairSync('rsa', { modulusLength: 2048 });
const signingKey = { ...privateKey.export({ format: 'jwk' }), alg: 'RS256', use: 'sig', kid: 'interop-1' };

function account(id) {
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
  if (!account(username)) {
    await provider.interactionFinished(req, res, {
      error: 'access_denied',
      error_description: 'unknown user',
    }, { mergeWithLastSubmission: false });
    return;
  }
  const { params } = details;
  const grant = new provider.Grant({ accountId: username, clientId: params.client_id });
  grant.addOIDCScope(String(params.scope ?? SCOPES.join(' ')));
  const grantId = await grant.save();
  await provider.interactionFinished(req, res, {
    login: { accountId: username },
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
    }],
    jwks: { keys: [signingKey] },
    cookies: { keys: [randomBytes(32).toString('hex')] },
    scopes: SCOPES,
    claims: {
      openid: ['sub'],
      profile: ['preferred_username', 'name'],
      email: ['email', 'email_verified'],
      groups: ['groups'],
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
      IdToken: idTokenTtl,
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
