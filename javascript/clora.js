// sd-webui-clora: hover titles for the CLoRA accordion's buttons (gradio 3.41 buttons take no title option).
// Element ids are clora_{txt2img|img2img}_{name}; nothing else is changed.
(function () {
    const titles = {
        refresh: "Reload the list of LoRAs",
        add_binding: "Show one more LoRA binding row",
        remove_binding: "Hide the last LoRA binding row and clear its fields",
        add_style: "Show one more style LoRA row",
        remove_style: "Hide the last style LoRA row and clear its fields",
    };

    function setTitles() {
        const root = typeof gradioApp === "function" ? gradioApp() : document;
        for (const tab of ["txt2img", "img2img"]) {
            for (const [name, title] of Object.entries(titles)) {
                const el = root.querySelector(`#clora_${tab}_${name}`);
                if (el) {
                    el.title = title;
                }
            }
        }
    }

    if (typeof onUiLoaded === "function") {
        onUiLoaded(setTitles);
    }
})();
