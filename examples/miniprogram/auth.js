/**
 * wxbroker client for WeChat mini programs: log in through the broker and call your API with the
 * broker's session token, logging in again when the token has gone stale.
 *
 *   const { createAuth } = require('./auth.js')
 *   const auth = createAuth({ baseUrl: 'https://api.example.com' })
 *   const res = await auth.request({ url: '/v1/session' })   // res is what wx.request gives
 *
 * Copy this file into the mini program as it is: it needs nothing but the `wx` API. It is written
 * in ES2017 (async/await) without newer syntax (no `?.`, no `??`, no class fields), so it runs on
 * the base library as-is and survives the developer tools' ES5 compilation ("enhanced compile").
 */

'use strict'

// Where the token lives. Storage rather than memory so that a cold start of the mini program
// reuses the session instead of spending a fresh wx.login code (and a WeChat round trip) on it.
const DEFAULT_STORAGE_KEY = 'wxbroker_session'

/**
 * Makes the client.
 *
 * @param {object} options
 * @param {string} options.baseUrl  where the broker (or the API in front of it) is served, such as
 *   'https://api.example.com'; relative `url`s given to `request` are resolved against it too.
 * @param {object} [options.wx]  the WeChat API; defaults to the `wx` global. Tests pass a stand-in.
 * @param {string} [options.storageKey]  the storage key of the token ('wxbroker_session').
 * @param {string} [options.loginPath]  the broker's login route ('/v1/login').
 * @param {string} [options.appid]  this mini program's appid, sent with the code, for a broker that
 *   serves several (`wx.getAccountInfoSync().miniProgram.appId`); without it, the broker's default
 *   app.
 */
function createAuth(options) {
  const opts = options || {}
  // `typeof` guards the bare `wx` name so that the module still loads where there is no such
  // global (Node, in the tests); a missing API is reported below instead of as a ReferenceError.
  const api = opts.wx || (typeof wx !== 'undefined' ? wx : undefined) // eslint-disable-line no-undef
  if (!api) {
    throw new TypeError('createAuth: no wx API (pass { wx } when not running in a mini program)')
  }
  if (typeof opts.baseUrl !== 'string' || !/^https?:\/\//i.test(opts.baseUrl)) {
    throw new TypeError('createAuth: baseUrl must be an http(s) URL, got ' + String(opts.baseUrl))
  }
  const baseUrl = opts.baseUrl.replace(/\/+$/, '')
  const storageKey = opts.storageKey || DEFAULT_STORAGE_KEY
  const loginPath = opts.loginPath || '/v1/login'
  const appid = opts.appid

  // The login being made right now, shared by everyone who needs a token meanwhile. Without it, a
  // page that fires five requests on load with an expired token would spend five wx.login codes
  // and create five sessions, four of which are thrown away at once.
  let loginInFlight = null

  /**
   * Logs in: wx.login for a code, the code to the broker, the broker's token into storage.
   * Resolves with the token. Calls made while a login is under way share it.
   */
  function login() {
    if (!loginInFlight) {
      loginInFlight = freshLogin().then(
        function (token) {
          loginInFlight = null
          return token
        },
        function (err) {
          // Forget a failed login so that the next call tries again instead of failing forever.
          loginInFlight = null
          throw err
        }
      )
    }
    return loginInFlight
  }

  async function freshLogin() {
    let loginResult
    try {
      loginResult = await call(api, 'login', {})
    } catch (err) {
      throw brokerError('wx_login_failed', 'wx.login failed: ' + describe(err), { cause: err })
    }
    if (!loginResult || !loginResult.code) {
      throw brokerError('wx_login_failed', 'wx.login gave no code')
    }

    let res
    try {
      res = await call(api, 'request', {
        url: baseUrl + loginPath,
        method: 'POST',
        header: { 'content-type': 'application/json' },
        data: appid ? { code: loginResult.code, appid } : { code: loginResult.code }
      })
    } catch (err) {
      throw brokerError('network', 'could not reach the broker to log in: ' + describe(err), {
        cause: err
      })
    }

    const body = res.data
    if (res.statusCode !== 200) {
      // The broker's own answer says best what went wrong (invalid_code, code_used, rate_limited,
      // upstream_busy...), so pass its code and message on rather than a generic "login failed".
      const code = body && typeof body === 'object' && body.error ? body.error : 'login_failed'
      const detail = body && typeof body === 'object' && body.message ? ': ' + body.message : ''
      throw brokerError(code, 'login failed (' + res.statusCode + ' ' + code + ')' + detail, {
        statusCode: res.statusCode,
        response: res
      })
    }
    if (!body || typeof body !== 'object' || typeof body.thirdSession !== 'string') {
      // Typically a proxy or captive portal answering in the broker's place.
      throw brokerError('bad_login_response', 'login answer carries no thirdSession', {
        statusCode: res.statusCode,
        response: res
      })
    }

    try {
      await call(api, 'setStorage', { key: storageKey, data: body.thirdSession })
    } catch (err) {
      // Not fatal: the token still serves the request that asked for it; the next request simply
      // finds no stored token and logs in again. Failing here would waste a session that works.
      if (typeof console !== 'undefined') {
        console.warn('wxbroker: could not store the session token:', describe(err))
      }
    }
    return body.thirdSession
  }

  /** The stored token, or '' when there is none. Never rejects. */
  async function getToken() {
    // The synchronous read is preferred: it cannot interleave with a login finishing, which keeps
    // the "has someone already replaced this token?" check in `renew` exact.
    if (typeof api.getStorageSync === 'function') {
      try {
        const token = api.getStorageSync(storageKey)
        return typeof token === 'string' ? token : ''
      } catch (err) {
        return ''
      }
    }
    try {
      const res = await call(api, 'getStorage', { key: storageKey })
      return res && typeof res.data === 'string' ? res.data : ''
    } catch (err) {
      // getStorage fails for a key that was never set: that just means "not logged in yet".
      return ''
    }
  }

  /**
   * A token to use instead of `staleToken`, which the server has just refused.
   *
   * Requests that were in the air together come back with 401 at slightly different times. The
   * first one starts a login; the others either join it while it runs (`login` shares it) or, if
   * it has already finished, find that the stored token is no longer the one they were refused
   * with and just use the new one. Only a request still holding the current token logs in.
   */
  async function renew(staleToken) {
    const current = await getToken()
    if (current && current !== staleToken) return current
    return login()
  }

  /**
   * wx.request with `Authorization: Bearer <token>`, logging in first when there is no token.
   *
   * Takes the options of wx.request (without success/fail/complete) and resolves with its result,
   * `{ statusCode, data, header }`, whatever the status: as with wx.request, a 404 or a 500 is an
   * answer to look at, not an exception. A 401 means the session is gone (expired, logged out,
   * revoked), so it logs in again and retries once; if the retry is refused too, that 401 is
   * handed back, because a second login would not fix what the first could not. Rejects when
   * logging in fails (the error's `code` is the broker's, such as 'invalid_code') or when the
   * request cannot be sent at all.
   */
  async function request(options) {
    if (!options || typeof options.url !== 'string') {
      throw new TypeError('request: options.url is required')
    }
    const token = (await getToken()) || (await login())
    const first = await send(options, token)
    if (first.statusCode !== 401) return first
    const fresh = await renew(token)
    return send(options, fresh)
  }

  async function send(options, token) {
    const params = {}
    Object.keys(options).forEach(function (name) {
      // The promise is the interface; callbacks given here would fire once per attempt.
      if (name !== 'success' && name !== 'fail' && name !== 'complete') params[name] = options[name]
    })
    params.url = resolveUrl(options.url)
    params.header = withBearer(options.header, token)
    try {
      return await call(api, 'request', params)
    } catch (err) {
      throw brokerError('network', 'request to ' + params.url + ' failed: ' + describe(err), {
        cause: err
      })
    }
  }

  /**
   * Ends the session at the broker and forgets the token. The local token is dropped even when
   * the broker cannot be reached: a user who logged out must not stay logged in on this phone.
   */
  async function logout() {
    const token = await getToken()
    try {
      if (token) {
        await call(api, 'request', {
          url: baseUrl + '/v1/logout',
          method: 'POST',
          header: withBearer(undefined, token)
        })
      }
    } catch (err) {
      // Best effort: the session then simply expires at the broker.
    } finally {
      try {
        await call(api, 'removeStorage', { key: storageKey })
      } catch (err) {
        // Nothing stored: nothing to remove.
      }
    }
  }

  function resolveUrl(url) {
    if (/^https?:\/\//i.test(url)) return url
    return baseUrl + (url.charAt(0) === '/' ? '' : '/') + url
  }

  return { login: login, request: request, logout: logout, getToken: getToken }
}

/** Header object with the caller's headers and our Authorization, whatever case theirs used. */
function withBearer(header, token) {
  const out = {}
  Object.keys(header || {}).forEach(function (name) {
    // A stale token passed in by the caller must not ride along next to ours.
    if (name.toLowerCase() !== 'authorization') out[name] = header[name]
  })
  out.Authorization = 'Bearer ' + token
  return out
}

/** Runs a callback-style wx API (`success`/`fail`) as a promise. */
function call(api, name, params) {
  return new Promise(function (resolve, reject) {
    if (typeof api[name] !== 'function') {
      reject(new TypeError('wx.' + name + ' is not available'))
      return
    }
    const args = Object.assign({}, params, { success: resolve, fail: reject })
    try {
      api[name](args)
    } catch (err) {
      reject(err)
    }
  })
}

/**
 * An Error with the fields callers branch on: `code` (the broker's error code, or
 * 'wx_login_failed', 'network', 'bad_login_response', 'login_failed'), and when the broker
 * answered, `statusCode` and `response`. A plain Error rather than a subclass, because
 * subclassing Error breaks `instanceof` once compiled to ES5.
 */
function brokerError(code, message, extra) {
  const err = new Error('wxbroker: ' + message)
  err.name = 'WxBrokerError'
  err.code = code
  Object.assign(err, extra || {})
  return err
}

// wx failures are plain objects with an errMsg, not Errors.
function describe(err) {
  if (!err) return 'unknown error'
  if (err.errMsg) return err.errMsg
  if (err.message) return err.message
  return String(err)
}

module.exports = { createAuth: createAuth }
