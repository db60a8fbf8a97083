// Passkeys (WebAuthn): the form marked data-passkey="get" (login) or "create" (settings)
// asks the browser for a credential with the options of #passkey-options, puts the
// answer (its JSON form) in the form's "credential" field and posts the form.
// The texts for the browser's errors come in #passkey-text, in the page's language.
(function () {
  'use strict';
  const form = document.querySelector('form[data-passkey]');
  if (!form) return;
  const options = JSON.parse(document.getElementById('passkey-options').textContent);
  const text = JSON.parse(document.getElementById('passkey-text').textContent);
  const status = form.querySelector('[data-passkey-status]');
  const button = form.querySelector('button[type=submit]');

  const bytes = (s) => Uint8Array.from(atob(s.replace(/-/g, '+').replace(/_/g, '/')), (c) => c.charCodeAt(0));
  const b64url = (buf) => btoa(String.fromCharCode(...new Uint8Array(buf)))
    .replace(/\+/g, '-').replace(/\//g, '_').replace(/=+$/, '');
  const descriptors = (list) => (list || []).map((c) => ({ ...c, id: bytes(c.id) }));

  function publicKey() {
    if (form.dataset.passkey === 'create') {
      return { ...options, challenge: bytes(options.challenge), user: { ...options.user, id: bytes(options.user.id) },
               excludeCredentials: descriptors(options.excludeCredentials) };
    }
    return { ...options, challenge: bytes(options.challenge), allowCredentials: descriptors(options.allowCredentials) };
  }

  // The credential's JSON form (WebAuthn Level 3 toJSON, spelled out for browsers without it).
  function toJSON(cred) {
    const r = cred.response;
    const response = { clientDataJSON: b64url(r.clientDataJSON) };
    if (r.attestationObject) {
      response.attestationObject = b64url(r.attestationObject);
      response.transports = r.getTransports ? r.getTransports() : [];
    } else {
      response.authenticatorData = b64url(r.authenticatorData);
      response.signature = b64url(r.signature);
      if (r.userHandle) response.userHandle = b64url(r.userHandle);
    }
    return { id: cred.id, rawId: b64url(cred.rawId), type: cred.type, response,
             authenticatorAttachment: cred.authenticatorAttachment || undefined,
             clientExtensionResults: cred.getClientExtensionResults() };
  }

  function say(key) {
    status.textContent = text[key] || text.failed;
    status.hidden = false;
  }

  // The button comes disabled: a press before this script runs would post no answer.
  if (!window.PublicKeyCredential || !navigator.credentials) say('unsupported');
  else button.disabled = false;

  form.addEventListener('submit', async (event) => {
    if (form.elements.credential.value) return; // the answer is in: post it
    event.preventDefault();
    button.disabled = true;
    say('waiting');
    try {
      const call = form.dataset.passkey === 'create' ? 'create' : 'get';
      const cred = await navigator.credentials[call]({ publicKey: publicKey() });
      form.elements.credential.value = JSON.stringify(cred.toJSON ? cred.toJSON() : toJSON(cred));
      form.submit();
    } catch (err) {
      button.disabled = false;
      say({ NotAllowedError: 'not_allowed', InvalidStateError: 'exists', SecurityError: 'security' }[err.name]);
    }
  });
})();
