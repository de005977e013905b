/*
 * esp8266.ino: the examples/device loop on a real board.
 *
 *   NOT COMPILED HERE: an illustration only. Nothing in this repository
 *   builds or tests this sketch. Check it against the library versions you
 *   install before you trust it.
 *
 * An ESP8266 behind NAT dials out to wsrouter as the host of a hostclient
 * registration and answers HTTP requests relayed to it
 * (GET http://router:8741/relay/<id>/...):
 *
 *   GET /                       an HTML page with the LED state
 *   GET|POST /led?state=on|off|toggle
 *                               switches the built-in LED, answers JSON
 *   anything else               404
 *
 * Libraries (Arduino Library Manager):
 *   "WebSockets" by Markus Sattler (arduinoWebSockets: WebSocketsClient)
 *   "ArduinoJson" by Benoit Blanchon, version 7
 *
 * Register first from any computer, then put the id and key below:
 *   export WSR_KEY=$(openssl rand -hex 16) WSR_HOST_KEY=$(openssl rand -hex 16)
 *   curl -H "X-Key: $WSR_KEY" -H "X-Host-Key: $WSR_HOST_KEY" \
 *        -d reg_type=hostclient -d id_req=garage-esp http://router:8741/register
 *
 * The protocol, in short: each relay request arrives as one text frame
 *   {"rid":"<32 hex>","method":"GET","path":"/led","query":{"state":"on"},...}
 * and is answered with one text frame carrying the same rid:
 *   {"rid":"<same>","status":200,"type":"html","content":"<h1>on</h1>"}
 * Frames without rid and method are ordinary messages from clients: ignore
 * them. The answer must come within the router's -relay-timeout (10 s).
 */

#include <ESP8266WiFi.h>
#include <WebSocketsClient.h>
#include <ArduinoJson.h>

const char *WIFI_SSID = "your-wifi";
const char *WIFI_PASS = "your-wifi-password";

const char *ROUTER_HOST = "router.example.com";
const uint16_t ROUTER_PORT = 8741;
const char *REG_ID = "garage-esp";
const char *REG_KEY = "the-registration-key"; // keep this file private

WebSocketsClient ws;
bool led = false;

void setLed(bool on) {
  led = on;
  digitalWrite(LED_BUILTIN, on ? LOW : HIGH); // the built-in LED is active low
}

// reply answers the request rid; content is sent as the HTTP body.
void reply(const char *rid, int status, const char *type, const String &content) {
  JsonDocument out;
  out["rid"] = rid;
  out["status"] = status;
  out["type"] = type; // html, text, json, ... or a media type such as "text/csv"
  out["content"] = content;
  String frame;
  serializeJson(out, frame);
  ws.sendTXT(frame);
}

void onFrame(const uint8_t *payload, size_t length) {
  JsonDocument req;
  if (deserializeJson(req, (const char *)payload, length)) {
    return; // not JSON: an ordinary message
  }
  const char *rid = req["rid"];
  const char *method = req["method"];
  const char *path = req["path"];
  if (!rid || !method || !path) {
    return; // not a relay request
  }
  bool get = strcmp(method, "GET") == 0;

  if (strcmp(path, "/") == 0 && get) {
    String page = "<!doctype html><meta charset=\"utf-8\"><title>esp8266</title>"
                  "<h1>esp8266</h1><p>LED is <b>";
    page += led ? "on" : "off";
    page += "</b>, up ";
    page += millis() / 1000;
    page += " s (<a href=\"led?state=toggle\">toggle</a>)</p>";
    reply(rid, 200, "html", page);
  } else if (strcmp(path, "/led") == 0 && (get || strcmp(method, "POST") == 0)) {
    // query values are strings, or arrays when a name repeats (then null here)
    const char *state = req["query"]["state"];
    if (state && strcmp(state, "on") == 0) {
      setLed(true);
    } else if (state && strcmp(state, "off") == 0) {
      setLed(false);
    } else if (state && strcmp(state, "toggle") == 0) {
      setLed(!led);
    } else if (state) {
      reply(rid, 400, "text", "state: want on, off or toggle\n");
      return;
    }
    reply(rid, 200, "json", led ? "{\"led\":\"on\"}" : "{\"led\":\"off\"}");
  } else {
    reply(rid, 404, "text", "no such page on this device\n");
  }
}

void onEvent(WStype_t type, uint8_t *payload, size_t length) {
  switch (type) {
  case WStype_CONNECTED:
    Serial.println("connected to the router as host");
    break;
  case WStype_DISCONNECTED:
    // A refusal (403 wrong key, 404 unknown id) also ends up here: the
    // library does not report the HTTP status. It retries by itself.
    Serial.println("disconnected; retrying");
    break;
  case WStype_TEXT:
    onFrame(payload, length);
    break;
  default:
    break;
  }
}

void setup() {
  Serial.begin(115200);
  pinMode(LED_BUILTIN, OUTPUT);
  setLed(false);

  WiFi.mode(WIFI_STA);
  WiFi.begin(WIFI_SSID, WIFI_PASS);
  while (WiFi.status() != WL_CONNECTED) {
    delay(250);
  }

  // The key in the query, as a browser would send it. Sending it as a
  // header instead keeps it out of proxy logs:
  //   ws.setExtraHeaders("X-Key: the-registration-key");
  // and drop "&key=..." from the URL.
  String url = String("/connect?id=") + REG_ID + "&key=" + REG_KEY + "&sock_type=host";
  ws.begin(ROUTER_HOST, ROUTER_PORT, url.c_str(), ""); // "": no subprotocol
  // The library sends "Origin: file://" unless told otherwise; a router
  // started with -allowed-origins would refuse that origin with 403.
  ws.setExtraHeaders("");
  ws.onEvent(onEvent);
  ws.setReconnectInterval(5000);
  // The router pings every 30 s and the library answers by itself; our own
  // pings notice a dead connection sooner and keep the NAT mapping warm.
  ws.enableHeartbeat(15000, 3000, 2);
  // For an https router: ws.beginSSL(ROUTER_HOST, 443, url.c_str(), ...).
}

void loop() {
  ws.loop();
}
