// auth.js against a real broker (in sandbox mode), with a stand-in for the `wx` API.
//
//   BROKER_URL=http://127.0.0.1:8080 node --test examples/miniprogram/test/auth.test.js
//
// `cargo test --test integration miniprogram` starts a broker and runs this file against it.

'use strict'

const test = require('node:test')
const assert = require('node:assert/strict')
const { setTimeout: sleep } = require('node:timers/promises')

const { createAuth } = require('../auth.js')

const KEY = 'wxbroker_session'

// A client that loops or waits forever must fail its test, not stall the run.
const TIMEOUT = { timeout: 15000 }

// Sandbox codes are single-use; a per-run tag lets this file run again and again against the same
// long-lived broker without meeting its own codes from an earlier run ("code been used").
const RUN = process.pid.toString(36) + Date.now().toString(36)
let codeCounter = 0

/** The broker under test. Fails, never skips: a test that cannot run must not look green. */
function brokerUrl() {
  const url = process.env.BROKER_URL
  if (!url) {
    throw new Error(
      'BROKER_URL is not set. Start a broker (e.g. `cargo run -- --login-rate-per-min 0`) and run ' +
        'BROKER_URL=http://127.0.0.1:8080 node --test examples/miniprogram/test/auth.test.js, ' +
        'or run `cargo test --test integration miniprogram`, which does both.'
    )
  }
  return url.replace(/\/+$/, '')
}

/**
 * A stand-in for the `wx` API, as far as auth.js uses it: callbacks (never promises), called
 * asynchronously, failures as `{ errMsg }`, and a wx.request that resolves `success` for every
 * HTTP status. `log` records what happened, in order, for the assertions.
 */
function fakeWx(user) {
  const storage = new Map()
  const log = []
  const wx = {
    storage,
    log,
    // Replaced by tests that want wx.login to hand out failing codes.
    nextCode: function () {
      codeCounter += 1
      return user + '.' + RUN + '_' + codeCounter
    },
    // Hooks for the tests that need to steer timing: run before a request is sent and before its
    // answer is delivered.
    beforeSend: null,
    beforeDeliver: null,

    logins: function () {
      return log.filter((e) => e.kind === 'login').length
    },
    requestsTo: function (path) {
      return log.filter((e) => e.kind === 'request' && new URL(e.url).pathname === path)
    },

    login: function ({ success, fail }) {
      const code = wx.nextCode()
      log.push({ kind: 'login', code })
      later(() => (code ? success({ code, errMsg: 'login:ok' }) : fail({ errMsg: 'login:fail' })))
    },

    request: function ({ url, method = 'GET', data, header = {}, success, fail }) {
      method = method.toUpperCase()
      const headers = Object.assign({ 'content-type': 'application/json' }, header)
      const entry = { kind: 'request', method, url, authorization: lookup(headers, 'authorization') }
      log.push(entry)
      ;(async () => {
        if (wx.beforeSend) await wx.beforeSend(entry)
        let target = url
        let body
        // wx.request puts `data` in the query string for GET and serializes it by content-type
        // otherwise; reproduce that so auth.js is tested against the encoding it really gets.
        if (data !== undefined && (method === 'GET' || method === 'HEAD')) {
          const u = new URL(url)
          for (const [k, v] of Object.entries(data)) u.searchParams.set(k, String(v))
          target = u.toString()
        } else if (data !== undefined) {
          body = typeof data === 'string' ? data : JSON.stringify(data)
        }
        const res = await fetch(target, { method, headers, body })
        const text = await res.text()
        let parsed = text
        try {
          if (text) parsed = JSON.parse(text)
        } catch (err) {
          // Not JSON: wx.request hands the text over as it is.
        }
        const answer = {
          statusCode: res.status,
          data: parsed,
          header: Object.fromEntries(res.headers),
          errMsg: 'request:ok'
        }
        entry.status = res.status
        if (wx.beforeDeliver) await wx.beforeDeliver(entry, answer)
        return answer
      })().then(success, (err) => fail({ errMsg: 'request:fail ' + err.message }))
    },

    setStorage: function ({ key, data, success }) {
      log.push({ kind: 'setStorage', key, data })
      storage.set(key, data)
      later(() => success({ errMsg: 'setStorage:ok' }))
    },
    getStorage: function ({ key, success, fail }) {
      later(() =>
        storage.has(key)
          ? success({ data: storage.get(key), errMsg: 'getStorage:ok' })
          : fail({ errMsg: 'getStorage:fail data not found' })
      )
    },
    getStorageSync: function (key) {
      return storage.has(key) ? storage.get(key) : ''
    },
    setStorageSync: function (key, data) {
      log.push({ kind: 'setStorage', key, data })
      storage.set(key, data)
    },
    removeStorage: function ({ key, success }) {
      storage.delete(key)
      later(() => success({ errMsg: 'removeStorage:ok' }))
    }
  }
  return wx
}

function later(fn) {
  setImmediate(fn)
}

function lookup(headers, name) {
  const key = Object.keys(headers).find((k) => k.toLowerCase() === name)
  return key === undefined ? undefined : headers[key]
}

/** Ends a session behind the client's back, as an expiry or a logout elsewhere would. */
async function invalidate(token) {
  const res = await fetch(brokerUrl() + '/v1/logout', {
    method: 'POST',
    headers: { authorization: 'Bearer ' + token }
  })
  assert.equal(res.status, 204, 'logout answers 204')
  const check = await fetch(brokerUrl() + '/v1/session', {
    headers: { authorization: 'Bearer ' + token }
  })
  assert.equal(check.status, 401, 'the logged-out token is refused')
  assert.equal((await check.json()).error, 'invalid_session')
}

/** A client logged in as `user`, with its stand-in wx and its first token. */
async function loggedIn(user) {
  const wx = fakeWx(user)
  const auth = createAuth({ baseUrl: brokerUrl(), wx })
  const res = await auth.request({ url: '/v1/session' })
  assert.equal(res.statusCode, 200, JSON.stringify(res.data))
  return { wx, auth, token: wx.storage.get(KEY), uid: res.data.uid }
}

test('BROKER_URL points at a running broker', TIMEOUT, async () => {
  const res = await fetch(brokerUrl() + '/healthz')
  assert.equal(res.status, 200, 'GET /healthz')
})

test('the first request logs in, stores the token and sends it as a Bearer token', TIMEOUT, async () => {
  const wx = fakeWx('alice')
  const auth = createAuth({ baseUrl: brokerUrl() + '/', wx })

  const res = await auth.request({ url: '/v1/session' })

  assert.equal(res.statusCode, 200, JSON.stringify(res.data))
  assert.equal(typeof res.data.uid, 'number')
  assert.equal(typeof res.data.openid, 'string')
  assert.equal(wx.logins(), 1)

  const [login] = wx.requestsTo('/v1/login')
  assert.equal(login.method, 'POST')
  const stored = wx.log.filter((e) => e.kind === 'setStorage')
  assert.equal(stored.length, 1, 'one setStorage')
  assert.equal(stored[0].key, KEY)
  const token = stored[0].data
  assert.match(token, /^[A-Za-z0-9_-]{20,}$/)
  assert.equal(await auth.getToken(), token)

  const sessions = wx.requestsTo('/v1/session')
  assert.equal(sessions.length, 1)
  assert.equal(sessions[0].authorization, 'Bearer ' + token)
})

test('a stored token is reused, also by a fresh start of the mini program', TIMEOUT, async () => {
  const { wx, token, uid } = await loggedIn('bob')

  const again = await createAuth({ baseUrl: brokerUrl(), wx }).request({ url: '/v1/session' })

  assert.equal(again.statusCode, 200)
  assert.equal(again.data.uid, uid)
  assert.equal(wx.logins(), 1, 'no second login')
  assert.deepEqual(
    wx.requestsTo('/v1/session').map((e) => e.authorization),
    ['Bearer ' + token, 'Bearer ' + token]
  )
})

test('login() sends the code as JSON and resolves with the token', TIMEOUT, async () => {
  const wx = fakeWx('bob')
  const auth = createAuth({ baseUrl: brokerUrl(), wx })

  const token = await auth.login()

  assert.equal(wx.storage.get(KEY), token)
  const check = await fetch(brokerUrl() + '/v1/session', {
    headers: { authorization: 'Bearer ' + token }
  })
  assert.equal(check.status, 200)
})

test('with an appid, the login is for that mini program of the broker', TIMEOUT, async () => {
  const wx = fakeWx('cara')
  const auth = createAuth({ baseUrl: brokerUrl(), wx, appid: 'wxsandbox0000001' })

  const res = await auth.request({ url: '/v1/session' })

  assert.equal(res.statusCode, 200, JSON.stringify(res.data))
  assert.equal(res.data.appid, 'wxsandbox0000001')
})

test('after the token is invalidated, the next request logs in once, retries and succeeds', TIMEOUT, async () => {
  const { wx, auth, token, uid } = await loggedIn('carol')
  await invalidate(token)

  const res = await auth.request({ url: '/v1/session' })

  assert.equal(res.statusCode, 200, JSON.stringify(res.data))
  assert.equal(res.data.uid, uid, 'the same user again')
  assert.equal(wx.logins(), 2, 'exactly one more login')
  const fresh = wx.storage.get(KEY)
  assert.notEqual(fresh, token, 'the new token is stored')
  assert.deepEqual(
    wx.requestsTo('/v1/session').map((e) => [e.authorization, e.status]),
    [
      ['Bearer ' + token, 200],
      ['Bearer ' + token, 401],
      ['Bearer ' + fresh, 200]
    ]
  )
})

test('when logging in fails, request rejects with the broker error and does not loop', TIMEOUT, async () => {
  const wx = fakeWx('dave')
  wx.nextCode = () => 'err40029.' + RUN + '_' + ++codeCounter
  const auth = createAuth({ baseUrl: brokerUrl(), wx })

  await assert.rejects(auth.request({ url: '/v1/session' }), (err) => {
    assert.equal(err.code, 'invalid_code')
    assert.equal(err.statusCode, 401)
    assert.match(err.message, /login failed \(401 invalid_code\)/)
    return true
  })
  assert.equal(wx.logins(), 1, 'a single login attempt')
  assert.equal(wx.requestsTo('/v1/session').length, 0, 'nothing sent without a token')
  assert.equal(wx.storage.has(KEY), false)

  // The failure is not remembered: the next call tries again, once.
  await assert.rejects(auth.request({ url: '/v1/session' }), { code: 'invalid_code' })
  assert.equal(wx.logins(), 2)
})

test('with a stale token and failing logins, request tries one login and rejects', TIMEOUT, async () => {
  const { wx, auth, token } = await loggedIn('erin')
  await invalidate(token)
  wx.nextCode = () => 'err40029.' + RUN + '_' + ++codeCounter

  await assert.rejects(auth.request({ url: '/v1/session' }), { code: 'invalid_code' })

  assert.equal(wx.logins(), 2, 'the first login and one attempt to renew')
  assert.equal(wx.requestsTo('/v1/session').length, 2, 'the first request and the refused one')
})

test('a second 401 is handed back to the caller, after a single re-login', TIMEOUT, async () => {
  const { wx, auth } = await loggedIn('frank')
  // Every token dies just before it is used, so the retry is refused too.
  wx.beforeSend = async (entry) => {
    if (new URL(entry.url).pathname === '/v1/session') {
      await invalidate(entry.authorization.replace(/^Bearer /, ''))
    }
  }

  const res = await auth.request({ url: '/v1/session' })

  assert.equal(res.statusCode, 401)
  assert.equal(res.data.error, 'invalid_session')
  assert.equal(wx.logins(), 2, 'one re-login, not a loop')
  assert.equal(wx.requestsTo('/v1/session').length, 3, 'first call, then one attempt and one retry')
})

test('concurrent requests after invalidation share one re-login', TIMEOUT, async () => {
  const { wx, auth, token, uid } = await loggedIn('grace')
  await invalidate(token)
  // A slow wx.login keeps the login in flight while the other 401s arrive.
  const login = wx.login
  wx.login = (args) => setTimeout(() => login(args), 100)

  const answers = await Promise.all(
    Array.from({ length: 8 }, () => auth.request({ url: '/v1/session' }))
  )

  for (const res of answers) {
    assert.equal(res.statusCode, 200, JSON.stringify(res.data))
    assert.equal(res.data.uid, uid)
  }
  assert.equal(wx.logins(), 2, 'exactly one re-login')
  const fresh = wx.storage.get(KEY)
  const retries = wx.requestsTo('/v1/session').filter((e) => e.authorization !== 'Bearer ' + token)
  assert.equal(retries.length, 8)
  assert.ok(retries.every((e) => e.authorization === 'Bearer ' + fresh))
})

test('a 401 arriving after the re-login finished uses the new token without logging in', TIMEOUT, async () => {
  const { wx, auth, token } = await loggedIn('heidi')
  await invalidate(token)
  // Hold back the second request's 401 until the first request's re-login has stored a new
  // token, so that it finds its token already replaced rather than a login in flight.
  let refused = 0
  wx.beforeDeliver = async (entry) => {
    if (entry.status === 401 && ++refused === 2) {
      // Bounded, so that a client that never logs in again fails the assertions below instead.
      for (let i = 0; i < 200 && wx.storage.get(KEY) === token; i++) await sleep(5)
      await sleep(20)
    }
  }

  const answers = await Promise.all([
    auth.request({ url: '/v1/session' }),
    auth.request({ url: '/v1/session' })
  ])

  assert.deepEqual(
    answers.map((r) => r.statusCode),
    [200, 200]
  )
  assert.equal(wx.logins(), 2, 'exactly one re-login')
})

test('concurrent first requests share one login', TIMEOUT, async () => {
  const wx = fakeWx('ivan')
  const auth = createAuth({ baseUrl: brokerUrl(), wx })

  const answers = await Promise.all(
    Array.from({ length: 5 }, () => auth.request({ url: '/v1/session' }))
  )

  assert.ok(answers.every((r) => r.statusCode === 200))
  assert.equal(wx.logins(), 1)
})

test('logout() ends the session at the broker and forgets the token', TIMEOUT, async () => {
  const { wx, auth, token } = await loggedIn('judy')

  await auth.logout()

  assert.equal(wx.storage.has(KEY), false)
  assert.equal(await auth.getToken(), '')
  const check = await fetch(brokerUrl() + '/v1/session', {
    headers: { authorization: 'Bearer ' + token }
  })
  assert.equal(check.status, 401)
})
