//! GStreamer errors as one line: the first error a pipeline posted on its bus, named by the
//! kind of element that failed (`rtspsrc`, `qtdemux`), not by its name inside the pipeline.

use gstreamer as gst;
use gstreamer::prelude::*;

/// `"element: message"` for the first error waiting on `pipeline`'s bus, if any.
pub fn first_error(pipeline: &gst::Pipeline) -> Option<String> {
    let bus = pipeline.bus()?;
    while let Some(msg) = bus.pop_filtered(&[gst::MessageType::Error]) {
        if let gst::MessageView::Error(e) = msg.view() {
            let element = e
                .src()
                .map(|s| {
                    s.downcast_ref::<gst::Element>()
                        .and_then(|el| el.factory())
                        .map_or_else(|| s.name().to_string(), |f| f.name().to_string())
                })
                .unwrap_or_else(|| "pipeline".into());
            return Some(format!("{element}: {}", e.error()));
        }
    }
    None
}
