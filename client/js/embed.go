// Package js holds the JavaScript client (wsrouter.js and its types) for
// the router to serve at /client.js, so that a page can import it from the
// router it talks to. The module itself is documented in wsrouter.js.
package js

import _ "embed"

// Source is wsrouter.js.
//
//go:embed wsrouter.js
var Source []byte

// Types is wsrouter.d.ts.
//
//go:embed wsrouter.d.ts
var Types []byte
