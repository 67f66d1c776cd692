// JSON edits sent with the OpenAI Node SDK. Its `images.edit` sends only multipart (6.49.0,
// the pinned version, and 7.60.0, the newest when these were made): a JSON edit goes through
// the client's own `post`, with the SDK's headers, retries and response types.
//
// Usage: node json_edits.mjs BASE_URL API_KEY (NODE_PATH: where `openai` is installed)
import { createRequire } from 'node:module';
import path from 'node:path';

const require = createRequire(path.join(process.env.NODE_PATH, 'x.js'));
const { default: OpenAI } = await import(require.resolve('openai'));
const [baseURL, apiKey] = process.argv.slice(2);
const client = new OpenAI({ baseURL, apiKey, maxRetries: 0 });
const PNG_DATA_URL =
  'data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg==';

// Images by URL, one on the web and one inline.
let img = await client.post('/images/edits', {
  body: {
    model: 'gpt-image-1',
    prompt: 'Add a watercolor effect to this image',
    images: [{ image_url: 'https://example.com/source-image.png' }, { image_url: PNG_DATA_URL }],
    size: '1024x1024',
    quality: 'high',
  },
});
if (!img.data[0].b64_json) throw new Error('no image');

// Images and mask by uploaded file id.
img = await client.post('/images/edits', {
  body: {
    model: 'gpt-image-1.5',
    prompt: 'Replace the background with a snowy mountain scene',
    images: [{ file_id: 'file-abc123' }, { file_id: 'file-def456' }],
    mask: { file_id: 'file-mask123' },
    output_format: 'png',
    output_compression: 100,
  },
});
if (!img.data[0].b64_json) throw new Error('no image');

// Streamed, with partial images.
const stream = await client.post('/images/edits', {
  body: {
    model: 'gpt-image-1',
    prompt: 'A red fox in the snow',
    images: [{ image_url: 'https://example.com/fox.png' }],
    stream: true,
    partial_images: 2,
  },
  stream: true,
});
const types = [];
for await (const event of stream) types.push(event.type);
if (types[types.length - 1] !== 'image_edit.completed') throw new Error(`events: ${types}`);
