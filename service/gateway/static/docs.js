// Swagger UI over the sidecar's own /openapi.json. Every asset comes from this sidecar: no
// validator badge (it would call an outside host), and Authorize keeps the bearer token across
// reloads of this page (in the browser's local storage).
"use strict";
window.ui = SwaggerUIBundle({
  url: new URL("openapi.json", document.baseURI).href,
  dom_id: "#swagger-ui",
  deepLinking: true,
  persistAuthorization: true,
  displayRequestDuration: true,
  tryItOutEnabled: true,
  validatorUrl: null,
  presets: [SwaggerUIBundle.presets.apis],
  layout: "BaseLayout",
});
